"""Checkpoints: the full training state, the data iterator and the config, with orbax.

Layout of a workdir (local or gs://):

  DIR/checkpoints/<step>/state    params, opt_state, step (sharded arrays)
  DIR/checkpoints/<step>/data     the input iterator's state (JSON)
  DIR/checkpoints/<step>/config   the resolved experiment config (JSON)

and of a params-only export (for generation, evaluation and conversion):

  OUT/params               the params pytree (float32 or bfloat16)
  OUT/model_config.json    the ModelConfig fields

Saves are asynchronous: the arrays are copied off the accelerator, then
written by a background thread while training continues. Orbax writes each
step into a temporary directory and renames it when complete (on GCS a commit
marker plays that role), so a crash mid-save leaves nothing that looks
complete and resume falls back to the previous step.
"""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from llm import sharding
from llm.model import ModelConfig, abstract_params

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


def _abstract(tree, shardings=None):
  """ShapeDtypeStructs (with target shardings) for orbax to restore into."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  if isinstance(shardings, jax.sharding.Sharding):  # One sharding for every leaf.
    shardings = jax.tree.map(lambda _: shardings, tree)
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

  def restore_params(self, step: int, abstract_params, shardings=None):
    """Only the params of a training checkpoint; the optimizer state is never read."""
    abstract = {'params': _abstract(abstract_params, shardings)}
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


TOKENIZER_DIR = 'tokenizer'  # Tokenizer files stored beside exported or imported params.


def save_params(directory: str, cfg: ModelConfig, params, dtype: str | None = None) -> None:
  """Writes params (cast to `dtype` if given) and the ModelConfig; never overwrites.

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
    (directory / 'model_config.json').write_text(json.dumps(dataclasses.asdict(cfg), indent=2))


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


def load_params(path: str, *, shardings=None, mesh=None, dtype: str | None = None):
  """(ModelConfig, params, config dict or None) from a workdir or a params export.

  A workdir gives the params of its newest complete checkpoint; the optimizer
  state is not read. With `mesh` each param is read straight into its shards
  (sharded by its logical axes, as in training); `shardings` gives them
  explicitly instead. `dtype` casts the params after loading.
  """
  path = _absolute(path)
  if (path / 'model_config.json').exists():
    cfg = ModelConfig.from_dict(json.loads((path / 'model_config.json').read_text()))
    config = None
    if mesh is not None:
      shardings = sharding.logical_shardings(abstract_params(cfg), mesh)
    with ocp.StandardCheckpointer() as ckptr:
      meta = ckptr.metadata(path / 'params').item_metadata
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta.tree)
      if shardings is not None:
        target = _abstract(target, shardings)
      params = ckptr.restore(path / 'params', target)
  elif (path / 'checkpoints').exists():
    ckpt = Checkpointer(str(path), async_save=False)
    step = ckpt.latest_step()
    if step is None:
      raise ValueError(f'{path} has no complete checkpoint under {path / "checkpoints"}.')
    config = ckpt.saved_config(step)
    cfg = ModelConfig.from_dict(config['model'])
    if mesh is not None:
      shardings = sharding.logical_shardings(abstract_params(cfg), mesh)
    params = ckpt.restore_params(step, nn.unbox(abstract_params(cfg)), shardings)
    ckpt.close()
  else:
    raise ValueError(
      f'{path} is neither a training workdir (no checkpoints/) nor a params export '
      '(no model_config.json).'
    )
  if dtype is not None:
    params = jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), params)
  return cfg, params, config


def load_model(path: str, *, mesh=None, tokenizer: str = ''):
  """(ModelConfig, params, tokenizer) from a workdir or a params export, for inference.

  Params are read onto `mesh` (none: the default device); the tokenizer is
  `tokenizer` if given (see `load_tokenizer`), else the one the model was
  trained or imported with.
  """
  cfg, params, config = load_params(path, mesh=mesh)
  if mesh is None:
    params = jax.device_put(params)
  return cfg, params, load_tokenizer(path, config, tokenizer)


def load_tokenizer(path: str, config: dict | None, choice: str = ''):
  """The tokenizer: `choice` ('byte', a .model file or a Hugging Face directory), else the
  training config's data.tokenizer, else a params export's `tokenizer/` directory."""
  import ml_collections

  from llm.data import tokenizer as data_tokenizer

  if choice:
    if os.path.isdir(choice):
      from llm.convert import tokenizer as hf_tokenizer

      return hf_tokenizer.load(choice)
    return data_tokenizer.load(ml_collections.ConfigDict({'tokenizer': choice}))
  if config is not None:
    return data_tokenizer.load(ml_collections.ConfigDict(config['data']))
  if os.path.isdir(os.path.join(path, TOKENIZER_DIR)):
    from llm.convert import tokenizer as hf_tokenizer

    return hf_tokenizer.load(os.path.join(path, TOKENIZER_DIR))
  raise ValueError(
    f'{path} holds no tokenizer (no training config, no {TOKENIZER_DIR}/ directory); pass '
    "--tokenizer='byte', a sentencepiece .model file or a Hugging Face tokenizer directory."
  )


def export_params(workdir: str, out: str, dtype: str = 'float32') -> None:
  """Params of `workdir`'s newest checkpoint -> a params-only directory `out`."""
  cfg, params, _ = load_params(workdir)
  save_params(out, cfg, params, dtype)


def main(argv):
  del argv
  from absl import flags

  FLAGS = flags.FLAGS
  export_params(FLAGS.workdir, FLAGS.out, FLAGS.dtype)
  print(f'Exported the params of {FLAGS.workdir} to {FLAGS.out} in {FLAGS.dtype}.')


if __name__ == '__main__':
  from absl import app, flags

  flags.DEFINE_string('workdir', None, 'Training workdir whose newest checkpoint to export.')
  flags.DEFINE_string('out', None, 'Directory for the params-only export.')
  flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Dtype of the exported params.')
  flags.mark_flags_as_required(['workdir', 'out'])
  app.run(main)
