"""Checkpoints: the full training state, the data iterator and the config, with orbax.

Layout of a workdir (local or gs://):

  DIR/checkpoints/<step>/state    params, opt_state, step (sharded arrays)
  DIR/checkpoints/<step>/data     the input iterator's state (JSON)
  DIR/checkpoints/<step>/config   the resolved experiment config (JSON)

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
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

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
      },
    )

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step (temporary, unfinished saves are ignored)."""
    return self._manager.latest_step()

  def save(self, step: int, state, data_state, config) -> None:
    """Starts an asynchronous save; returns once the arrays are off the devices."""
    self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state),
        data=ocp.args.JsonSave({'iterators': all_host_states(data_state)}),
        config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
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
    )
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
    )
    return out['state']['params']

  def _restore_items(self, step: int, **items):
    path = self.directory / str(step)
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, FileNotFoundError, OSError) as e:
      raise ValueError(
        f'The checkpoint {path} is corrupt or incomplete ({type(e).__name__}: {e}); '
        'delete it to resume from the previous one.'
      ) from e

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


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
