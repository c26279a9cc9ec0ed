"""Checkpoints: the full training state, the data iterator and the config, with orbax.

Layout of a workdir (local or gs://):

  DIR/checkpoints/<step>/state      params, opt_state, step (sharded arrays)
  DIR/checkpoints/<step>/data       the input iterator's state (JSON)
  DIR/checkpoints/<step>/config     the resolved experiment config (JSON)
  DIR/checkpoints/<step>/checksums  two uint32 sums per array, its shape and dtype (JSON)
  DIR/checkpoints-set-aside/<step>  steps moved away to resume from an older one

and of a params-only export (for generation, evaluation and conversion):

  OUT/params               the params pytree (float32 or bfloat16)
  OUT/model_config.json    the ModelConfig fields
  OUT/tokenizer/           the tokenizer the model reads (llm/data/tokenizer.py)

A workdir holds its tokenizer in DIR/tokenizer/ too. Reading any of them, or
a Hugging Face directory, goes through `llm.io.models.open`.

Saves are asynchronous: the arrays are copied off the accelerator, then
written by a background thread while training continues. Orbax writes each
step into a temporary directory and renames it when complete (on GCS a commit
marker plays that role), so a crash mid-save leaves nothing that looks
complete and resume falls back to the previous step.

What such a step holds is checked too: every save records checksums of the
arrays, computed on the devices from the arrays as they are in memory, and
every restore recomputes them from what it read. A checkpoint that changed on
disk, or that orbax cannot read, stops the run with one sentence naming the
step and the previous complete one; nothing ever falls back to an older step
silently. Resuming from an older step is a request (`set_aside_after`).
"""

import dataclasses
import functools
import gc
import json
import logging
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from llm.data import tokenizer as tokenizer_lib
from llm.model import ModelConfig

# ModelConfig fields that change the parameters' shapes or tree: a checkpoint
# cannot be resumed with other values. (dtype, remat, attention_impl... may change.)
SHAPE_FIELDS = (
  'vocab_size',
  'num_layers',
  'd_model',
  'num_heads',
  'num_kv_heads',
  'head_dim',
  'd_ff',
  'norm',
  'mlp',
  'position',
  'use_bias',
  'tie_embeddings',
  'scan_layers',
)


def _abstract(tree, shardings):
  """ShapeDtypeStructs with target shardings for orbax to restore into."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


def all_host_states(state) -> list:
  """Every host's data-iterator state, in process order.

  Each host reads its own slice of the data, so each has its own state; all of
  them go into the checkpoint (written by process 0) and each host takes its own
  back on restore.
  """
  if jax.process_count() == 1:
    return [state]
  from jax.experimental import multihost_utils

  data = np.frombuffer(json.dumps(state).encode(), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.array([data.size]))).ravel()
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[: data.size] = data
  rows = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, lengths, strict=True)]


class Checkpointer:
  """Saves and restores training checkpoints under `workdir/checkpoints`."""

  def __init__(self, workdir: str, *, keep: int = 3, keep_period: int = 0, async_save=True):
    self.directory = _absolute(workdir) / 'checkpoints'
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep or None,
      keep_period=keep_period or None,
      enable_async_checkpointing=async_save,
      create=True,
    )
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=options,
      item_handlers={
        'state': ocp.PyTreeCheckpointHandler(),
        'data': ocp.JsonCheckpointHandler(),
        'config': ocp.JsonCheckpointHandler(),
        CHECKSUMS: ocp.JsonCheckpointHandler(),
      },
    )

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step (temporary, unfinished saves are ignored)."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """The complete checkpoints' steps, oldest first."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, data_state, config) -> None:
    """Starts an asynchronous save; returns once the arrays are off the devices.

    The checksums are taken here, from the arrays in device memory, so that
    anything that goes wrong after this point (the copy, the write, the disk)
    shows on restore.
    """
    self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state),
        data=ocp.args.JsonSave({'iterators': all_host_states(data_state)}),
        config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
        **{CHECKSUMS: ocp.args.JsonSave({'algorithm': ALGORITHM, 'arrays': checksums(state)})},
      ),
      force=True,
    )

  def saved_config(self, step: int) -> dict:
    return self._restore_items(step, config=ocp.args.JsonRestore())['config']

  def restore(self, step: int, target_state, shardings):
    """Restores (state, data_state) of `step` onto `shardings`, whatever mesh saved it."""
    abstract = _abstract(target_state, shardings)
    out = self._restore_items(
      step,
      state=ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)
      ),
      data=ocp.args.JsonRestore(),
      **self._checksums_item(step),
    )
    self._verify(step, out['state'], out.get(CHECKSUMS))
    states = out['data']['iterators']
    if len(states) != jax.process_count():
      raise ValueError(
        f'The data state in {self.directory / str(step)} was saved by {len(states)} hosts; '
        f'this run has {jax.process_count()}, and each host resumes its own slice of the data.'
      )
    return out['state'], states[jax.process_index()]

  def restore_params(self, step: int, target):
    """Only the params of a training checkpoint, or those `target` names (ShapeDtypeStructs
    with shardings); the optimizer state is never read."""
    abstract = {'params': target}
    out = self._restore_items(
      step,
      state=ocp.args.PyTreeRestore(
        item=abstract,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True,
      ),
      **self._checksums_item(step),
    )
    self._verify(step, out['state'], out.get(CHECKSUMS))
    return out['state']['params']

  def _checksums_item(self, step: int) -> dict:
    """Checkpoints written before checksums existed have none to read."""
    if (self.directory / str(step) / CHECKSUMS).exists():
      return {CHECKSUMS: ocp.args.JsonRestore()}
    return {}

  def _verify(self, step: int, restored, saved: dict | None) -> None:
    """Stops unless every restored array has the checksum it was saved with.

    Only arrays restored in their saved dtype are compared: a cast (a target
    in another dtype) changes the bits, not the checkpoint.
    """
    path = self.directory / str(step)
    if saved is None or saved.get('algorithm') != ALGORITHM:
      if jax.process_index() == 0:
        print(f'{path} holds no checksums we know; restored without verifying it.', flush=True)
      return
    expected = saved['arrays']
    bad = [
      key
      for key, got in checksums(restored).items()
      if key in expected
      and expected[key]['dtype'] == got['dtype']
      and expected[key]['checksum'] != got['checksum']
    ]
    if bad:
      more = f' and {len(bad) - 3} more' if len(bad) > 3 else ''
      raise ValueError(
        f'The checkpoint {path} does not match the checksums it was saved with in '
        f'{", ".join(bad[:3])}{more}, so its files changed after it was written; '
        f'{self._advice(step)}'
      )

  def _restore_items(self, step: int, **items):
    path = self.directory / str(step)
    _ignore_closed_loop_callbacks()
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # Orbax and TensorStore raise all kinds, bare Exception included.
      # The step's other reads fail too, in tasks nobody awaits: no tracebacks for them.
      logging.getLogger('asyncio').setLevel(logging.CRITICAL)
      gc.collect()
      raise ValueError(
        f'The checkpoint {path} is corrupt or incomplete ({_first_line(e)}); {self._advice(step)}'
      ) from e

  def _advice(self, step: int) -> str:
    """What to do about a bad `step`: resume from the complete step before it, if any."""
    older = [s for s in self.all_steps() if s < step]
    if older:
      return (
        f'set --config.resume_step={older[-1]} to resume from the previous complete '
        'checkpoint, or move it away.'
      )
    return 'no earlier complete checkpoint exists, so start a new workdir, or move it away.'

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _ignore_closed_loop_callbacks() -> None:
  """Silences TensorStore's late calls into the event loop orbax closed after a failed
  restore (unraisable `Event loop is closed` tracebacks): the failure is one sentence."""
  hook = sys.unraisablehook
  if getattr(hook, 'ignores_closed_loop', False):
    return

  def quiet(unraisable):
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and 'Event loop is closed' in str(value):
      return
    hook(unraisable)

  quiet.ignores_closed_loop = True
  sys.unraisablehook = quiet


def _first_line(error: BaseException, limit: int = 200) -> str:
  """The type and first line of the innermost cause: orbax wraps TensorStore's errors in
  vaguer ones, and TensorStore's messages run over many lines."""
  for _ in range(10):
    cause = error.__cause__ or error.__context__
    if cause is None:
      break
    error = cause
  lines = str(error).strip().splitlines()
  text = lines[0].strip() if lines else ''
  if len(text) > limit:
    text = text[: limit - 3] + '...'
  return f'{type(error).__name__}: {text}' if text else type(error).__name__


def set_aside_after(workdir: str, step: int) -> list[int]:
  """Moves every checkpoint newer than `step` (complete or not) to
  DIR/checkpoints-set-aside/, so that a run resumes from `step`; returns their steps.

  Nothing is deleted: a checkpoint that failed to restore stays there to be
  looked at, and one moved away by mistake can be moved back. Call this before
  any Checkpointer opens `workdir`: a Checkpointer lists the steps when it is
  created and would not see them go. Stops, moving nothing, unless `step` is a
  complete checkpoint. Every host calls it; process 0 moves.
  """
  root = _absolute(workdir)
  source, aside = root / 'checkpoints', root / 'checkpoints-set-aside'
  complete = sorted(ocp.utils.checkpoint_steps(source))
  if step not in complete:
    raise ValueError(
      f'{source} holds no complete checkpoint at step {step}; its complete steps are '
      f'{complete or "none"}.'
    )
  names = [p.name for p in source.iterdir() if (_step_of(p.name) or 0) > step]
  _barrier('set_aside_after listed')  # Every host lists before anything moves.
  if names and jax.process_index() == 0:
    aside.mkdir(parents=True, exist_ok=True)
    for name in sorted(names):
      target, n = aside / name, 0
      while target.exists():
        n += 1
        target = aside / f'{name}-{n}'
      (source / name).rename(target)
  _barrier('set_aside_after moved')
  return sorted({_step_of(name) for name in names})


def _step_of(name: str) -> int | None:
  """The step of a step directory's name: '600', or a save in progress, '600.orbax-...'."""
  head = name.split('.')[0]
  return int(head) if head.isdigit() else None


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------
# Checksums.

CHECKSUMS = 'checksums'  # The orbax item holding them.
ALGORITHM = 'uint32-weighted-sums-1'


def checksums(tree) -> dict[str, dict]:
  """Two 32-bit checksums of every array in `tree`, with its shape and dtype, by '/'-joined key.

  Computed on the devices, in one program, and the same whatever mesh or
  sharding the arrays have: each is a wrap-around uint32 sum, which adds up
  the same in any order, so per-shard partial sums give the unsharded result.
  Each array is read once, in place (`_leaf_checksum`).
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  if not leaves:
    return {}
  arrays = [x for _, x in leaves]
  sums = np.asarray(jax.device_get(_checksum_fn(_replicated(arrays[0]))(arrays)))
  return {
    jax.tree_util.keystr(path, simple=True, separator='/'): {
      'checksum': [int(a), int(b)],
      'shape': list(np.shape(x)),
      'dtype': str(x.dtype),
    }
    for (path, x), (a, b) in zip(leaves, sums, strict=True)
  }


def _replicated(x):
  """The sums' sharding: on every device of the arrays' mesh, so every host can read them."""
  s = getattr(x, 'sharding', None)
  return NamedSharding(s.mesh, PartitionSpec()) if isinstance(s, NamedSharding) else None


@functools.lru_cache(maxsize=8)
def _checksum_fn(out_sharding):
  """fn(arrays) -> their checksums as rows of one [n, 2] array (one transfer)."""
  return jax.jit(lambda xs: jnp.stack([_leaf_checksum(x) for x in xs]), out_shardings=out_sharding)


def _leaf_checksum(x):
  """[sum(bits * odd(i)), sum((bits ^ mix(i)) * odd'(i))] over the flat index i.

  An odd weight times any single-bit change is non-zero modulo 2**32, so any
  one flipped bit changes the first sum; the weights depend on the position,
  so moved or swapped elements change them too. Both sums are one variadic
  reduce: XLA fuses the arithmetic into it and reads each element once, where
  two `jnp.sum`s on XLA:CPU materialise both terms (twice the array) and run
  about 40 times slower.
  """
  bits = _bits(x)
  i = _flat_index(bits.shape)
  h = _mix(i)
  terms = (bits * (i * jnp.uint32(2) + jnp.uint32(1)), (bits ^ h) * (h | jnp.uint32(1)))
  zero = jnp.uint32(0)
  add = lambda p, q: (p[0] + q[0], p[1] + q[1])
  return jnp.stack(jax.lax.reduce(terms, (zero, zero), add, tuple(range(bits.ndim))))


def _bits(x):
  """The array's bits as uint32: one element per element of 1-4 bytes, two per 8 bytes."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size >= 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.dtype(f'uint{8 * size}')).astype(jnp.uint32)


def _flat_index(shape):
  """Each element's row-major index modulo 2**32, from one iota per dimension: reshaping
  a sharded array to 1-D would move it between devices."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for d in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(stride % 2**32)
    stride *= shape[d]
  return index


def _mix(i):
  """A cheap 32-bit integer hash (lowbias32), so that the second sum's weights look random."""
  i = (i ^ (i >> 16)) * jnp.uint32(0x7FEB352D)
  i = (i ^ (i >> 15)) * jnp.uint32(0x846CA68B)
  return i ^ (i >> 16)


def check_compatible(saved_model: dict, model_cfg: ModelConfig, path) -> None:
  """Stops when the config's model shape differs from the checkpoint's."""
  current = dataclasses.asdict(model_cfg)
  saved = dataclasses.asdict(ModelConfig.from_dict(saved_model))
  diffs = [f'{k}: {saved[k]!r} -> {current[k]!r}' for k in SHAPE_FIELDS if saved[k] != current[k]]
  if diffs:
    raise ValueError(
      f'The model config differs from the checkpoint in {path} in {", ".join(diffs)}; '
      "use the checkpoint's values or a new workdir."
    )


# ----------------------------------------------------------------------------
# Params-only export.


def save_params(
  directory: str, cfg: ModelConfig, params, dtype: str | None = None, *, tokenizer=None
) -> None:
  """Writes params (cast to `dtype` if given), the ModelConfig and a tokenizer copy; never
  overwrites.

  Numpy leaves (a fresh Hugging Face import) are moved to host jax arrays one by
  one, in place: orbax would copy numpy arrays before writing, holding the model
  twice, while jax arrays it writes as they are.
  """
  directory = _absolute(directory)
  if (directory / 'params').exists():
    raise ValueError(f'{directory} already holds params; choose a new directory.')
  directory.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory / 'params', _host_arrays_inplace(params, dtype))
  if jax.process_index() == 0:
    # 'auto': an export runs on whatever platform reads it.
    fields = dataclasses.asdict(dataclasses.replace(cfg, platform='auto'))
    (directory / 'model_config.json').write_text(json.dumps(fields, indent=2))
    if tokenizer is not None:
      tokenizer_lib.save_dir(tokenizer, directory / tokenizer_lib.DIRECTORY)


def save_tokenizer(workdir: str, tokenizer) -> None:
  """Puts the run's tokenizer copy in `workdir/tokenizer/` (process 0), unless one is there."""
  path = _absolute(workdir) / tokenizer_lib.DIRECTORY
  if tokenizer is not None and jax.process_index() == 0 and not path.exists():
    tokenizer_lib.save_dir(tokenizer, path)


def _host_arrays_inplace(params, dtype: str | None):
  params = dict(params)
  for key, value in params.items():
    if isinstance(value, dict):
      params[key] = _host_arrays_inplace(value, dtype)
      continue
    if dtype is not None and value.dtype != jnp.dtype(dtype):
      value = value.astype(dtype)
    if isinstance(value, np.ndarray):
      value = jax.device_put(value, jax.local_devices(backend='cpu')[0])
    params[key] = value
  return params


def _absolute(path: str) -> epath.Path:
  """Orbax wants absolute local paths; gs:// paths are left as they are."""
  return epath.Path(path if '://' in str(path) else os.path.abspath(path))


def export_shapes(directory: str) -> dict:
  """The params tree of an export as ShapeDtypeStructs (its stored dtypes), read from metadata."""
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(_absolute(directory) / 'params').item_metadata.tree
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta)


def restore_export(directory: str, target: dict) -> dict:
  """The params of an export that `target` (ShapeDtypeStructs with shardings) names, and only
  those: each is read straight into its shards."""
  with ocp.PyTreeCheckpointer() as reader:
    return reader.restore(
      _absolute(directory) / 'params',
      args=ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True,
      ),
    )
