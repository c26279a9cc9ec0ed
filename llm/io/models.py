"""One way from a path to a model: a training workdir, a params export or a Hugging Face directory.

`open(path)` tells which of the three a directory is and returns a `Source`:
its `ModelConfig`, the training config (a workdir's), the checkpoint step,
the parameters' shapes and stored dtypes, a reader that puts any subset of
the parameters straight onto given shardings, and the tokenizer the model
reads. Fine-tuning (`init_from`), generation, evaluation, fill-mask and
export all start here, so they accept the same paths and fail the same way.

  a training workdir   DIR/checkpoints/ (its newest complete checkpoint, or
                       `step`); only the params are read, never the
                       optimizer state; its tokenizer copy is DIR/tokenizer/
  a params export      DIR/model_config.json + DIR/params (llm/io/checkpoint.py),
                       with DIR/tokenizer/
  a Hugging Face dir   DIR/config.json + safetensors + tokenizer files,
                       converted on the fly (llm/convert/hf.py)
"""

import dataclasses
import json

import flax.linen as nn
import jax
import ml_collections
from etils import epath
from flax import traverse_util

from llm import sharding
from llm.data import hf_tokenizer
from llm.data import tokenizer as tokenizer_lib
from llm.io import checkpoint
from llm.model import ModelConfig, abstract_params, param_shardings, resolve


@dataclasses.dataclass(frozen=True)
class Source:
  """A model on disk (see the module docstring); `open` builds one."""

  path: str
  kind: str
  model_cfg: ModelConfig
  shapes: dict  # The params tree as ShapeDtypeStructs: stored layout and dtypes.
  config: dict | None = None  # A workdir's training config.
  step: int | None = None  # A workdir's checkpoint step.
  hf_overrides: dict = dataclasses.field(default_factory=dict)

  @property
  def description(self) -> str:
    """How reports name it: 'DIR (step 300)', 'DIR' or 'DIR (Hugging Face)'."""
    return {'workdir': f'{self.path} (step {self.step})', 'hf': f'{self.path} (Hugging Face)'}.get(
      self.kind, self.path
    )

  def read(self, shardings=None, names=None) -> dict:
    """The params (all, or the '/'-joined `names`) in their stored dtypes.

    `shardings`: a tree like `shapes` (or its `names` subset) of NamedShardings,
    onto which each param is read, every host filling only its own shards;
    None puts them on the default device.
    """
    flat = traverse_util.flatten_dict(self.shapes, sep='/')
    names = sorted(flat) if names is None else sorted(names)
    places = self._places(shardings, names)
    if self.kind in ('workdir', 'export'):
      target = {
        k: jax.ShapeDtypeStruct(flat[k].shape, flat[k].dtype, sharding=places[k]) for k in names
      }
      target = traverse_util.unflatten_dict(target, sep='/')
      if self.kind == 'export':
        return checkpoint.restore_export(self.path, target)
      ckpt = checkpoint.Checkpointer(self.path, async_save=False)
      try:
        return ckpt.restore_params(self.step, target)
      finally:
        ckpt.close()
    from llm.convert import hf  # Late: only Hugging Face directories need it.

    _, host = hf.load(self.path, **self.hf_overrides)
    host = traverse_util.flatten_dict(host, sep='/')
    out = {k: _place(host[k], places[k]) for k in names}
    return traverse_util.unflatten_dict(out, sep='/')

  def _places(self, shardings, names) -> dict:
    if shardings is None:
      device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      return dict.fromkeys(names, device)
    flat = traverse_util.flatten_dict(shardings, sep='/')
    return {k: flat[k] for k in names}

  def load(self, mesh=None, tokenizer: str = ''):
    """(ModelConfig, params, tokenizer) for inference on `mesh` (none: one device).

    The config's kernels are resolved for the mesh's platform and the params
    read onto it, sharded by their logical axes as in training.
    """
    mesh = sharding.one_device_mesh() if mesh is None else mesh
    cfg = resolve(self.model_cfg, mesh)
    return cfg, self.read(param_shardings(cfg, mesh)), self.tokenizer(tokenizer)

  def tokenizer(self, choice: str = ''):
    """`choice` ('byte', a .model file or a tokenizer directory), else the model's own.

    The model's own is its tokenizer copy (DIR/tokenizer/), or a Hugging Face
    directory's files. A workdir from before copies existed falls back to its
    data settings, but never trains or prepares anything.
    """
    if choice:
      return tokenizer_lib.load(ml_collections.ConfigDict({'tokenizer': choice}))
    copy = epath.Path(self.path) / tokenizer_lib.DIRECTORY
    if tokenizer_lib.is_dir(copy):
      return tokenizer_lib.load_dir(copy)
    if self.kind == 'hf' and hf_tokenizer.exists(self.path):
      return hf_tokenizer.load(self.path)
    if self.config is not None and self.config['data'].get('tokenizer', ''):
      data = ml_collections.ConfigDict(self.config['data'])
      return tokenizer_lib.load(data, train_if_missing=False)
    raise ValueError(
      f'{self.path} holds no tokenizer (no {tokenizer_lib.DIRECTORY}/ directory); pass '
      "--tokenizer='byte', a sentencepiece .model file or a tokenizer directory."
    )


def _place(host_array, sharding):
  """A host numpy array -> a global array; each host fills only its own shards."""
  return jax.make_array_from_callback(host_array.shape, sharding, lambda idx: host_array[idx])


def kind_of(path: str) -> str | None:
  """'workdir', 'export', 'hf', or None when `path` is none of them."""
  root = epath.Path(path)
  if (root / 'checkpoints').exists():
    return 'workdir'
  if (root / 'model_config.json').exists():
    return 'export'
  if (root / 'config.json').exists():
    config = json.loads((root / 'config.json').read_text())
    # A workdir writes its training config there before its first checkpoint.
    return 'workdir' if {'model', 'optim', 'data'} <= set(config) else 'hf'
  return None


def open(path: str, *, step: int = 0, **hf_overrides) -> Source:  # noqa: A001
  """The model at `path` (see the module docstring).

  step: a workdir's checkpoint to read; 0: the newest complete one.
  hf_overrides: ModelConfig runtime fields for a Hugging Face import
    (scan_layers, param_dtype...; `hf.RUNTIME_FIELDS`); ignored otherwise.
  """
  path = str(path)
  kind = kind_of(path)
  if kind is None:
    what = 'does not exist' if not epath.Path(path).exists() else 'is none of these'
    raise ValueError(
      f'{path} is neither a training workdir (checkpoints/), a params export '
      f'(model_config.json) nor a Hugging Face model directory (config.json): it {what}.'
    )
  if step and kind != 'workdir':
    raise ValueError(
      f'A checkpoint step ({step}) needs a training workdir, but {path} is a '
      f'{"params export" if kind == "export" else "Hugging Face directory"}, which holds one '
      'set of params; leave the step at 0.'
    )
  if kind == 'workdir':
    return _open_workdir(path, step)
  if kind == 'export':
    root = epath.Path(path)
    cfg = ModelConfig.from_dict(json.loads((root / 'model_config.json').read_text()))
    return Source(path, kind, cfg, checkpoint.export_shapes(path))
  from llm.convert import hf

  cfg = hf.config_from_hf(path, **hf_overrides)
  return Source(path, kind, cfg, _shapes(cfg), hf_overrides=dict(hf_overrides))


def _open_workdir(path: str, step: int) -> Source:
  if not (epath.Path(path) / 'checkpoints').exists():
    raise ValueError(f'{path} has no complete checkpoint under {path}/checkpoints.')
  ckpt = checkpoint.Checkpointer(path, async_save=False)
  try:
    step = step or ckpt.latest_step()
    if step is None or not (ckpt.directory / str(step)).exists():
      at = '' if step is None else f'at step {step} '
      raise ValueError(f'{path} has no complete checkpoint {at}under {ckpt.directory}.')
    config = ckpt.saved_config(step)
  finally:
    ckpt.close()
  cfg = ModelConfig.from_dict(config['model'])
  return Source(path, 'workdir', cfg, _shapes(cfg), config=config, step=step)


def _shapes(cfg: ModelConfig) -> dict:
  return nn.unbox(abstract_params(cfg))


def load(path: str, *, mesh=None, tokenizer: str = '', step: int = 0):
  """(ModelConfig, params, tokenizer) of the model at `path`, for inference (`Source.load`)."""
  return open(path, step=step).load(mesh, tokenizer)
