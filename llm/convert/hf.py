"""Hugging Face model directories in and out: `load`, `save`, and their tokenizers.

A directory is `config.json` plus `model.safetensors` (or shards named by
`model.safetensors.index.json`) plus tokenizer files. Supported architectures
are `GPT2LMHeadModel` (`llm/convert/gpt2.py`), `LlamaForCausalLM`
(`llm/convert/llama.py`), `BertForMaskedLM` (`llm/convert/bert.py`, which
also reads BertForPreTraining), and the mixtures of experts
`MixtralForCausalLM` (`llm/convert/mixtral.py`) and `Qwen3MoeForCausalLM`
(`llm/convert/qwen3_moe.py`); each family module maps tensor names and
layouts both ways. This module does what is common: it checks the tensor inventory before
reading any data, converts one tensor at a time into preallocated arrays (so a
large model is held once, plus one tensor), and writes shard by shard.

A family names a layer's tensors by layer index and a path inside the layer
(('attn', 'q'), or ('moe', 'wi', j) for expert j alone); `_layer_slots`
says where layer i lives in the scan layout, whose runs of identical layers
(`llm/model/block.py:groups`) stack each parameter on a leading axis.

Parameters come back as host numpy arrays: the caller places them on its mesh.
"""

import dataclasses
import json
import os
from collections.abc import Mapping

import flax.linen as nn
import ml_dtypes
import numpy as np
import tqdm

from llm import model as model_lib
from llm.convert import bert, gpt2, llama, mixtral, qwen3_moe, safetensors_io
from llm.data import hf_tokenizer as tokenizer_lib
from llm.model import ModelConfig
from llm.model import block as block_lib

_MODULES = (gpt2, llama, bert, mixtral, qwen3_moe)
FAMILIES = {m.ARCHITECTURE: m for m in _MODULES} | dict.fromkeys(bert.OTHER_ARCHITECTURES, bert)
_BY_MODEL_TYPE = {m.MODEL_TYPE: m for m in _MODULES}
# ModelConfig fields that change how the model runs, not what it computes.
RUNTIME_FIELDS = (
  'dtype',
  'param_dtype',
  'scan_layers',
  'remat',
  'attention_impl',
  'platform',
  'max_seq_len',
)
_NP_DTYPES = {
  'float32': np.dtype(np.float32),
  'bfloat16': np.dtype(ml_dtypes.bfloat16),
  'float16': np.dtype(np.float16),
}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' own default.

load_tokenizer = tokenizer_lib.load


def read_config(hf_dir: str) -> tuple[object, dict]:
  """(family module, config.json contents); stops on architectures we cannot convert."""
  path = os.path.join(hf_dir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{hf_dir} is not a Hugging Face model directory: no config.json.')
  with open(path) as f:
    hf = json.load(f)
  names = hf.get('architectures') or []
  family = FAMILIES.get(names[0]) if names else _BY_MODEL_TYPE.get(hf.get('model_type'))
  if family is None:
    found = names[0] if names else f'model_type {hf.get("model_type")!r}'
    raise ValueError(
      f'{path} describes {found}, which cannot be converted; supported architectures: '
      f'{", ".join(FAMILIES)}.'
    )
  return family, hf


def config_from_hf(hf_dir: str, **overrides) -> ModelConfig:
  """The ModelConfig of a Hugging Face directory; `overrides` may set RUNTIME_FIELDS only."""
  family, hf = read_config(hf_dir)
  fields = family.config_from_hf(hf)
  bad = sorted(set(overrides) - set(RUNTIME_FIELDS))
  if bad:
    raise ValueError(
      f'Overrides {bad} would change what the imported model computes; only '
      f'{", ".join(RUNTIME_FIELDS)} may be overridden.'
    )
  if 'max_seq_len' in overrides and fields['position'] == 'learned':
    raise ValueError(
      'max_seq_len cannot be overridden for a model with learned positions: it is the number '
      f'of rows of its position table ({fields["max_seq_len"]}).'
    )
  fields.update(overrides)
  return ModelConfig.from_dict(fields)


def _shapes(cfg: ModelConfig, use_bias: bool | None = None) -> dict:
  """Unboxed parameter shapes in the scan layout, allocating nothing."""
  cfg = dataclasses.replace(cfg, scan_layers=True, remat='none')
  if use_bias is not None:
    cfg = dataclasses.replace(cfg, use_bias=use_bias)
  return nn.unbox(model_lib.abstract_params(cfg))


def _leaf(tree: dict, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def _layer_slots(cfg: ModelConfig) -> list[tuple[tuple[str, ...], int]]:
  """Where each layer lives in the scan layout: (its params' prefix, index on their leading axis).

  A dense model's layer i is ('layers',), i; with moe_first_dense=k the first k
  are ('dense_layers',), i, and with moe_every=n each unit of n blocks holds
  layer i as ('layers', f'block_{j}'), g.
  """
  slots = []
  for group in block_lib.groups(cfg):
    n = len(group.sparse)
    for g in range(group.repeats):
      slots += [((group.name,) if n == 1 else (group.name, f'block_{j}'), g) for j in range(n)]
  return slots


def _split(ours: tuple) -> tuple[tuple, tuple]:
  """A family's path -> (dict keys, trailing indices into the leaf, e.g. an expert)."""
  keys = tuple(k for k in ours if isinstance(k, str))
  return keys, ours[len(keys) :]


def _paths(tree: dict, prefix=()) -> list[tuple]:
  out = []
  for key, value in tree.items():
    out += _paths(value, (*prefix, key)) if isinstance(value, dict) else [(*prefix, key)]
  return out


def load(hf_dir: str, **overrides) -> tuple[ModelConfig, dict]:
  """Imports a Hugging Face model directory as (ModelConfig, params).

  Params are numpy arrays in `param_dtype` (float32 unless overridden), in the
  scan layout when `cfg.scan_layers`. Stops before reading tensor data when a
  tensor is missing or unexpected, naming them.
  """
  family, hf = read_config(hf_dir)
  cfg = config_from_hf(hf_dir, **overrides)
  files = safetensors_io.checkpoint_files(hf_dir)
  present = {}
  for name in safetensors_io.tensor_names(files):
    canonical = family.canonical_name(name, cfg)
    if canonical in present:
      raise ValueError(f'{hf_dir} holds the same tensor twice: {present[canonical]} and {name}.')
    if canonical is not None:
      present[canonical] = name
  expected = family.expected_names(hf, cfg, frozenset(present))
  missing, unexpected = sorted(expected - set(present)), sorted(set(present) - expected)
  if missing:
    raise ValueError(f'{hf_dir} lacks tensors its config.json needs: {missing}.')
  if unexpected:
    raise ValueError(
      f'{hf_dir} holds tensors that its config.json does not account for, which would be '
      f'dropped: {unexpected}.'
    )

  params = _zeros_like(_shapes(cfg), _NP_DTYPES[cfg.param_dtype])
  slots, written = _layer_slots(cfg), set()
  # Progress on a terminal only (disable=None): a 70B import takes minutes.
  bar = tqdm.tqdm(total=len(present), desc=f'Importing {hf_dir}', unit='tensor', disable=None)
  for path in files:
    for name, w in safetensors_io.iter_tensors(path):
      canonical = family.canonical_name(name, cfg)
      if canonical is None:
        continue
      bar.update()
      for ours, layer, piece in family.to_ours(canonical, w, cfg):
        keys, index = _split(ours)
        prefix, unit = ((), None) if layer is None else slots[layer]
        full = (*prefix, *keys)
        dest = _leaf(params, full)
        for i in () if unit is None else (unit, *index):
          dest = dest[i]
        if dest.shape != piece.shape:
          raise ValueError(
            f'Tensor {name} has shape {w.shape}, which does not fit {"/".join(full)} '
            f'{dest.shape} of the model its config.json describes.'
          )
        dest[...] = piece
        written.add((full, unit))
  bar.close()
  stacked = {g.name for g in block_lib.groups(cfg)}
  for full in _paths(params):
    units = range(_leaf(params, full).shape[0]) if full[0] in stacked else [None]
    unwritten = [i for i in units if (full, i) not in written]
    # Biases Hugging Face does not have (e.g. Llama's mlp_bias=False) stay zero.
    if unwritten and not full[-1].endswith('_bias'):
      raise AssertionError(f'Conversion left {"/".join(full)} unwritten (units {unwritten}).')
  if not cfg.scan_layers:
    params = model_lib.unstack_layers(params, cfg)
  return cfg, params


def _as_dicts(tree):
  """Plain nested dicts (from FrozenDicts or other mappings), leaves untouched."""
  if isinstance(tree, Mapping):
    return {k: _as_dicts(v) for k, v in tree.items()}
  return tree


def _zeros_like(shapes: dict, dtype) -> dict:
  # np.zeros maps untouched pages lazily, so this costs memory only as it is filled.
  return {
    k: _zeros_like(v, dtype) if isinstance(v, dict) else np.zeros(v.shape, dtype)
    for k, v in shapes.items()
  }


def _export_family(cfg: ModelConfig):
  reasons = {m: m.check_exportable(cfg) for m in _MODULES}
  for family, why in reasons.items():
    if not why:
      return family
  raise ValueError(
    'The model fits no Hugging Face architecture: as '
    + '; as '.join(f'{m.ARCHITECTURE} it has {", ".join(why)}' for m, why in reasons.items())
    + '.'
  )


def _check_shapes(cfg: ModelConfig, params: dict, scanned: bool) -> None:
  want = nn.unbox(model_lib.abstract_params(dataclasses.replace(cfg, scan_layers=scanned)))
  want_paths, got_paths = set(_paths(want)), set(_paths(params))
  if want_paths != got_paths:
    raise ValueError(
      f'The params do not match the config: missing {sorted(want_paths - got_paths)}, '
      f'unexpected {sorted(got_paths - want_paths)}.'
    )
  for path in sorted(want_paths):
    got, expected = tuple(_leaf(params, path).shape), tuple(_leaf(want, path).shape)
    if got != expected:
      raise ValueError(f'Param {"/".join(path)} has shape {got}; the config needs {expected}.')


def _existing_model(hf_dir: str) -> list[str]:
  if not os.path.isdir(hf_dir):
    return []
  return sorted(
    n
    for n in os.listdir(hf_dir)
    if n == 'config.json' or (n.startswith('model') and 'safetensors' in n)
  )


def _getter(cfg: ModelConfig, params: dict, scanned: bool, np_dtype):
  """`get(path, layer)`: one of our tensors (layer None: outside the layers) as numpy.

  Reads either layout; biases the model has not got (use_bias=False) read as zeros.
  """
  zero_shapes, slots = _shapes(cfg, use_bias=True), _layer_slots(cfg)

  def get(path: tuple, layer: int | None) -> np.ndarray:
    keys, index = _split(path)
    prefix, unit = ((), None) if layer is None else slots[layer]
    # Only the use_bias biases can be absent (the MLM head's unembed_bias never is).
    if not cfg.use_bias and keys[-1].endswith('_bias') and keys[-1] != 'unembed_bias':
      shape = _leaf(zero_shapes, (*prefix, *keys)).shape
      return np.zeros(shape if layer is None else shape[1:], np_dtype)
    if layer is None:
      x = _leaf(params, keys)
    elif scanned:
      x = _leaf(params, (*prefix, *keys))[unit]
    else:
      x = _leaf(params[f'layers_{layer}'], keys)
    for i in index:
      x = x[i]
    return np.asarray(x).astype(np_dtype, copy=False)

  return get


def save(
  cfg: ModelConfig,
  params: dict,
  hf_dir: str,
  *,
  tokenizer=None,
  dtype: str | None = None,
  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
  """Exports (cfg, params) as a Hugging Face model directory that `from_pretrained` loads.

  Args:
    cfg: the model's config; picks the one architecture of `FAMILIES` that computes it.
    params: boxed or unboxed, scan or unrolled layout, numpy or jax arrays.
    hf_dir: created if needed; must not already hold a model.
    tokenizer: a `load_tokenizer` result or a directory holding Hugging Face
      tokenizer files; its files are copied and its special ids go into config.json.
    dtype: 'float32', 'bfloat16' or 'float16'; default: cfg.param_dtype.
    max_shard_bytes: shard size past which the weights are split into files.
  """
  family = _export_family(cfg)
  dtype = dtype or cfg.param_dtype
  if dtype not in _NP_DTYPES:
    raise ValueError(f'dtype={dtype!r} is not one of {", ".join(_NP_DTYPES)}.')
  existing = _existing_model(hf_dir)
  if existing:
    raise FileExistsError(f'{hf_dir} already holds a model ({existing}); choose a new directory.')
  if isinstance(tokenizer, str | os.PathLike):
    tokenizer = load_tokenizer(os.fspath(tokenizer))
  params = _as_dicts(nn.unbox(params))
  scanned = 'layers' in params
  _check_shapes(cfg, params, scanned)
  get = _getter(cfg, params, scanned, _NP_DTYPES[dtype])

  def nonzero(module: str, names: tuple[str, ...]) -> bool:
    # Sparse layers have no 'mlp' (their experts have no biases).
    layers = [i for i, s in enumerate(cfg.sparse_layers()) if module == 'attn' or not s]
    return cfg.use_bias and any(np.any(get((module, n), i) != 0) for n in names for i in layers)

  biases = {
    'attn': nonzero('attn', ('q_bias', 'k_bias', 'v_bias', 'o_bias')),
    'mlp': nonzero('mlp', ('wi_bias', 'wo_bias')),
  }
  hf = family.config_to_hf(cfg, biases)
  hf.update(torch_dtype=dtype, dtype=dtype)
  if tokenizer is not None:
    eos = list(tokenizer.eos_ids) or [tokenizer.eos_id]
    for name, value in (
      ('bos', tokenizer.bos_id),
      ('eos', eos[0] if len(eos) == 1 else eos),
      ('pad', tokenizer.pad_id if tokenizer.has_pad else -1),
    ):
      if name in family.SPECIAL_TOKEN_IDS:
        hf[f'{name}_token_id'] = None if value == -1 else value
  else:
    hf.update({f'{name}_token_id': None for name in family.SPECIAL_TOKEN_IDS if name != 'pad'})
  os.makedirs(hf_dir, exist_ok=True)
  tensors = tqdm.tqdm(
    family.to_hf(cfg, get, biases), desc=f'Exporting {hf_dir}', unit='tensor', disable=None
  )
  safetensors_io.write_shards(tensors, hf_dir, max_shard_bytes)
  with open(os.path.join(hf_dir, 'config.json'), 'w') as f:
    json.dump(hf, f, indent=2, sort_keys=True)
  if tokenizer is not None:
    tokenizer.save(hf_dir)


def save_tokenizer(tokenizer, out_dir: str) -> list[str]:
  """Writes a tokenizer's Hugging Face files (a `load_tokenizer` result or a directory)."""
  if isinstance(tokenizer, str | os.PathLike):
    return tokenizer_lib.copy_files(os.fspath(tokenizer), out_dir)
  return tokenizer.save(out_dir)
