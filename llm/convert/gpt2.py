"""GPT-2 (`GPT2LMHeadModel`) <-> `Transformer` with learned positions and LayerNorm.

Hugging Face GPT-2 stores its projections as `Conv1D` weights laid out
[in, out], with q, k and v fused into one `c_attn` [D, 3D] whose columns split
into heads as (N, H). Our kernels are the same matrices with the head axes
made explicit, so every mapping here is a split, a reshape or a transpose:
exact in both directions.

A tensor path in our tree is a tuple such as ('attn', 'q'); per-layer tensors
come with their layer index, top-level ones with None.
"""

import re
from collections.abc import Callable, Iterator

import numpy as np

from llm.model import ModelConfig

ARCHITECTURE = 'GPT2LMHeadModel'
MODEL_TYPE = 'gpt2'
# Token ids that config.json records on export.
SPECIAL_TOKEN_IDS = ('bos', 'eos', 'pad')

# Activations Hugging Face GPT-2 may name that equal our tanh-approximate GELU.
_TANH_GELUS = ('gelu_new', 'gelu_pytorch_tanh', 'gelu_fast')
_LAYER = re.compile(r'^h\.(\d+)\.(.+)$')
# Causal-mask buffers that older checkpoints saved with the weights.
_BUFFERS = re.compile(r'^h\.\d+\.attn\.(bias|masked_bias)$')

_NORMS = {'ln_1': 'attn_norm', 'ln_2': 'mlp_norm', 'ln_f': 'final_norm'}
_NORM_PARAMS = {'weight': 'scale', 'bias': 'bias'}
_LINEARS = {
  'mlp.c_fc.weight': ('mlp', 'wi'),
  'mlp.c_fc.bias': ('mlp', 'wi_bias'),
  'mlp.c_proj.weight': ('mlp', 'wo'),
  'mlp.c_proj.bias': ('mlp', 'wo_bias'),
  'attn.c_proj.bias': ('attn', 'o_bias'),
}


def config_from_hf(hf: dict) -> dict:
  """ModelConfig fields from a GPT-2 `config.json`; refuses variants we do not compute."""
  act = hf.get('activation_function', 'gelu_new')
  if act not in _TANH_GELUS:
    raise ValueError(
      f'GPT-2 activation_function={act!r} is not supported; the model computes the tanh '
      f'approximation of GELU, i.e. one of {", ".join(_TANH_GELUS)}.'
    )
  for key, want in (
    ('scale_attn_weights', True),
    ('scale_attn_by_inverse_layer_idx', False),
    ('add_cross_attention', False),
  ):
    if hf.get(key, want) != want:
      raise ValueError(f'GPT-2 {key}={hf[key]!r} is not supported; only {want} is.')
  d_model = hf.get('n_embd', 768)
  return dict(
    vocab_size=hf.get('vocab_size', 50257),
    num_layers=hf.get('n_layer', 12),
    d_model=d_model,
    num_heads=hf.get('n_head', 12),
    num_kv_heads=hf.get('n_head', 12),
    d_ff=hf.get('n_inner') or 4 * d_model,
    max_seq_len=hf.get('n_positions', 1024),
    norm='layernorm',
    norm_eps=hf.get('layer_norm_epsilon', 1e-5),
    mlp='gelu',
    position='learned',
    use_bias=True,
    tie_embeddings=hf.get('tie_word_embeddings', True),
    init_std=hf.get('initializer_range', 0.02),
  )


def check_exportable(cfg: ModelConfig) -> list[str]:
  """Reasons `cfg` cannot be written as GPT-2; empty when it can."""
  reasons = [
    f'model.{field}={getattr(cfg, field)!r} (GPT-2 needs {want!r})'
    for field, want in (
      ('norm', 'layernorm'),
      ('mlp', 'gelu'),
      ('position', 'learned'),
      ('causal', True),
      ('norm_position', 'pre'),
      ('type_vocab_size', 0),
      ('head', 'lm'),
      ('num_experts', 0),
      ('qk_norm', False),
      ('num_kv_heads', cfg.num_heads),
    )
    if getattr(cfg, field) != want
  ]
  if cfg.head_dim * cfg.num_heads != cfg.d_model:
    reasons.append(
      f'model.head_dim={cfg.head_dim} (GPT-2 needs d_model / num_heads = '
      f'{cfg.d_model / cfg.num_heads:g})'
    )
  return reasons


def config_to_hf(cfg: ModelConfig, biases: dict[str, bool]) -> dict:
  """A GPT-2 `config.json` for `cfg` (biases is unused: GPT-2 always has them)."""
  del biases
  return dict(
    architectures=[ARCHITECTURE],
    model_type=MODEL_TYPE,
    vocab_size=cfg.vocab_size,
    n_positions=cfg.max_seq_len,
    n_embd=cfg.d_model,
    n_layer=cfg.num_layers,
    n_head=cfg.num_heads,
    n_inner=cfg.d_ff,
    activation_function='gelu_new',
    layer_norm_epsilon=cfg.norm_eps,
    initializer_range=cfg.init_std,
    scale_attn_weights=True,
    scale_attn_by_inverse_layer_idx=False,
    reorder_and_upcast_attn=False,
    tie_word_embeddings=cfg.tie_embeddings,
  )


def _strip(name: str) -> str:
  # GPT2LMHeadModel prefixes 'transformer.'; checkpoints saved from GPT2Model do not.
  return name.removeprefix('transformer.')


def expected_names(hf: dict, cfg: ModelConfig, present: frozenset[str]) -> set[str]:
  """Tensor names (prefix stripped) a checkpoint with this config must hold."""
  del hf, present  # One layout, whatever the config.
  names = {'wte.weight', 'wpe.weight', 'ln_f.weight', 'ln_f.bias'}
  if not cfg.tie_embeddings:
    names.add('lm_head.weight')
  per_layer = [f'{n}.{p}' for n in ('ln_1', 'ln_2') for p in ('weight', 'bias')]
  per_layer += ['attn.c_attn.weight', 'attn.c_attn.bias', 'attn.c_proj.weight', *_LINEARS]
  for i in range(cfg.num_layers):
    names.update(f'h.{i}.{n}' for n in per_layer)
  return names


def canonical_name(name: str, cfg: ModelConfig) -> str | None:
  """The name `expected_names` uses, or None for tensors that carry no weights."""
  name = _strip(name)
  if _BUFFERS.match(name) or (name == 'lm_head.weight' and cfg.tie_embeddings):
    return None
  return name


def to_ours(
  name: str, w: np.ndarray, cfg: ModelConfig
) -> list[tuple[tuple, int | None, np.ndarray]]:
  """One canonical Hugging Face tensor -> [(our path, layer or None, array)]."""
  D, N, H = cfg.d_model, cfg.num_heads, cfg.head_dim
  if name == 'wte.weight':
    return [(('embedding',), None, w)]
  if name == 'wpe.weight':
    return [(('pos_embedding',), None, w)]
  if name == 'lm_head.weight':
    return [(('unembed',), None, w.T)]
  if name.startswith('ln_f.'):
    return [(('final_norm', _NORM_PARAMS[name[5:]]), None, w)]
  i, rest = _LAYER.match(name).groups()
  i = int(i)
  norm, _, param = rest.partition('.')
  if norm in _NORMS:
    return [((_NORMS[norm], _NORM_PARAMS[param]), i, w)]
  if rest == 'attn.c_attn.weight':
    q, k, v = np.split(w, 3, axis=1)
    return [(('attn', n), i, x.reshape(D, N, H)) for n, x in (('q', q), ('k', k), ('v', v))]
  if rest == 'attn.c_attn.bias':
    q, k, v = np.split(w, 3)
    return [(('attn', f'{n}_bias'), i, x.reshape(N, H)) for n, x in (('q', q), ('k', k), ('v', v))]
  if rest == 'attn.c_proj.weight':
    return [(('attn', 'o'), i, w.reshape(N, H, D))]
  return [(_LINEARS[rest], i, w)]


def to_hf(
  cfg: ModelConfig, get: Callable[[tuple, int | None], np.ndarray], biases: dict[str, bool]
) -> Iterator[tuple[str, np.ndarray]]:
  """(Hugging Face name, array) for every tensor, reading ours through `get(path, layer)`.

  GPT-2 always has biases, so `biases` is unused; a model without them gets
  zeros from `get`.
  """
  del biases
  D = cfg.d_model
  yield 'transformer.wte.weight', get(('embedding',), None)
  yield 'transformer.wpe.weight', get(('pos_embedding',), None)
  for i in range(cfg.num_layers):
    p = f'transformer.h.{i}.'
    yield p + 'ln_1.weight', get(('attn_norm', 'scale'), i)
    yield p + 'ln_1.bias', get(('attn_norm', 'bias'), i)
    w_qkv = [get(('attn', k), i).reshape(D, D) for k in 'qkv']
    yield p + 'attn.c_attn.weight', np.concatenate(w_qkv, axis=1)
    b_qkv = [get(('attn', f'{k}_bias'), i).reshape(D) for k in 'qkv']
    yield p + 'attn.c_attn.bias', np.concatenate(b_qkv)
    yield p + 'attn.c_proj.weight', get(('attn', 'o'), i).reshape(D, D)
    yield p + 'attn.c_proj.bias', get(('attn', 'o_bias'), i)
    yield p + 'ln_2.weight', get(('mlp_norm', 'scale'), i)
    yield p + 'ln_2.bias', get(('mlp_norm', 'bias'), i)
    for hf_name in ('mlp.c_fc.weight', 'mlp.c_fc.bias', 'mlp.c_proj.weight', 'mlp.c_proj.bias'):
      yield p + hf_name, get(_LINEARS[hf_name], i)
  yield 'transformer.ln_f.weight', get(('final_norm', 'scale'), None)
  yield 'transformer.ln_f.bias', get(('final_norm', 'bias'), None)
  if not cfg.tie_embeddings:
    yield 'lm_head.weight', get(('unembed',), None).T
