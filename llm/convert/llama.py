"""Llama (`LlamaForCausalLM`) <-> `Transformer` with RoPE, RMSNorm and SwiGLU.

Hugging Face stores `nn.Linear` weights as [out, in]; ours are [in, out] with
the head axes explicit, so q_proj [N*H, D] becomes q [D, N, H] by a transpose
and a reshape, and grouped-query k/v [K*H, D] become [D, K, H] the same way.
RoPE needs no permutation: `llm.layers.apply_rope` uses the rotate-half layout
that Hugging Face's Llama uses (checkpoints converted from Meta's originals
are already permuted into it by Hugging Face's own script).

Our SwiGLU is silu(x @ wg) * (x @ wi) @ wo, i.e. gate_proj -> wg, up_proj -> wi,
down_proj -> wo. `use_bias` gives biases to q, k, v, o, wi and wo but not wg;
Hugging Face's `attention_bias` / `mlp_bias` are separate switches and
`mlp_bias` also biases gate_proj, so a nonzero gate_proj bias cannot be
imported, and export writes only the bias groups that are nonzero.

Mixtral and Qwen3-MoE reuse the attention, norm and dense-MLP mappings here;
with `qk_norm` (Qwen3) `self_attn.{q,k}_norm.weight` are attn/{q,k}_norm/scale.
"""

import re
from collections.abc import Callable, Iterator

import numpy as np

from llm.model import ModelConfig

ARCHITECTURE = 'LlamaForCausalLM'
MODEL_TYPE = 'llama'
# Token ids that config.json records on export.
SPECIAL_TOKEN_IDS = ('bos', 'eos', 'pad')

_LAYER = re.compile(r'^model\.layers\.(\d+)\.(.+)$')
_BUFFERS = re.compile(r'rotary_emb\.inv_freq$')
_ATTN = ('q', 'k', 'v', 'o')
_MLP = {'up_proj': 'wi', 'gate_proj': 'wg', 'down_proj': 'wo'}
_NORMS = {'input_layernorm.weight': 'attn_norm', 'post_attention_layernorm.weight': 'mlp_norm'}
_ROPE_TYPES = ('default', 'linear', 'llama3')


def rope_fields(hf: dict, family: str = 'Llama', default_theta: float = 10000.0) -> dict:
  """RoPE fields from either config format: transformers 4 (`rope_theta`, `rope_scaling`)
  or 5 (`rope_parameters` holding both); Mixtral and Qwen3-MoE share Llama's."""
  rope = dict(hf.get('rope_parameters') or hf.get('rope_scaling') or {})
  theta = rope.get('rope_theta', hf.get('rope_theta', default_theta))
  kind = rope.get('rope_type', rope.get('type', 'default'))
  if kind not in _ROPE_TYPES:
    raise ValueError(
      f'{family} rope type {kind!r} is not supported; supported: {", ".join(_ROPE_TYPES)}.'
    )
  partial = rope.get('partial_rotary_factor', hf.get('partial_rotary_factor', 1.0))
  if partial != 1.0:
    raise ValueError(f'{family} partial_rotary_factor={partial} is not supported; only 1.0 is.')
  fields = dict(rope_theta=float(theta))
  if kind == 'default':
    return fields
  fields.update(rope_scaling=kind, rope_scaling_factor=float(rope['factor']))
  if kind == 'llama3':
    fields.update(
      rope_low_freq_factor=float(rope['low_freq_factor']),
      rope_high_freq_factor=float(rope['high_freq_factor']),
      rope_original_max_seq_len=int(
        rope.get('original_max_position_embeddings', hf.get('max_position_embeddings', 2048))
      ),
    )
  return fields


def silu_only(hf: dict, family: str) -> None:
  """Refuses a `hidden_act` other than silu, the only one SwiGLU here uses."""
  act = hf.get('hidden_act', 'silu')
  if act != 'silu':
    raise ValueError(f'{family} hidden_act={act!r} is not supported; SwiGLU here uses silu.')


def decoder_fields(
  hf: dict,
  family: str,
  *,
  vocab_size: int,
  num_layers: int,
  d_model: int,
  d_ff: int,
  max_seq_len: int,
  norm_eps: float,
  default_theta: float = 10000.0,
) -> dict:
  """The ModelConfig fields Llama, Mixtral and Qwen3-MoE share; the keywords are the
  family's defaults for keys `config.json` leaves out."""
  num_heads = hf.get('num_attention_heads', 32)
  d_model = hf.get('hidden_size', d_model)
  return dict(
    vocab_size=hf.get('vocab_size', vocab_size),
    num_layers=hf.get('num_hidden_layers', num_layers),
    d_model=d_model,
    num_heads=num_heads,
    num_kv_heads=hf.get('num_key_value_heads') or num_heads,
    head_dim=hf.get('head_dim') or d_model // num_heads,
    d_ff=hf.get('intermediate_size', d_ff),
    max_seq_len=hf.get('max_position_embeddings', max_seq_len),
    norm='rmsnorm',
    norm_eps=hf.get('rms_norm_eps', norm_eps),
    mlp='swiglu',
    position='rope',
    tie_embeddings=hf.get('tie_word_embeddings', False),
    init_std=hf.get('initializer_range', 0.02),
    **rope_fields(hf, family, default_theta),
  )


def config_from_hf(hf: dict) -> dict:
  """ModelConfig fields from a Llama `config.json` (missing keys take LlamaConfig's defaults)."""
  silu_only(hf, 'Llama')
  return dict(
    **decoder_fields(
      hf,
      'Llama',
      vocab_size=32000,
      num_layers=32,
      d_model=4096,
      d_ff=11008,
      max_seq_len=2048,
      norm_eps=1e-6,
    ),
    use_bias=bool(hf.get('attention_bias', False) or hf.get('mlp_bias', False)),
  )


# What every family written through this module needs, before its own fields.
DECODER = (
  ('norm', 'rmsnorm'),
  ('mlp', 'swiglu'),
  ('position', 'rope'),
  ('causal', True),
  ('norm_position', 'pre'),
  ('type_vocab_size', 0),
  ('head', 'lm'),
)


def mismatches(cfg: ModelConfig, family: str, wants) -> list[str]:
  """A reason for each (field, wanted value) in `wants` that `cfg` does not have."""
  return [
    f'model.{field}={getattr(cfg, field)!r} ({family} needs {want!r})'
    for field, want in wants
    if getattr(cfg, field) != want
  ]


def check_exportable(cfg: ModelConfig) -> list[str]:
  """Reasons `cfg` cannot be written as Llama; empty when it can."""
  reasons = mismatches(cfg, 'Llama', DECODER + (('num_experts', 0), ('qk_norm', False)))
  if cfg.d_model % cfg.num_heads:
    reasons.append(
      f'model.d_model={cfg.d_model} (transformers needs it divisible by num_heads={cfg.num_heads})'
    )
  return reasons


def rope_to_hf(cfg: ModelConfig) -> dict:
  """`rope_theta` and `rope_scaling` in the transformers 4 format, which transformers 5 reads."""
  rope_scaling = None
  if cfg.rope_scaling == 'linear':
    rope_scaling = dict(rope_type='linear', factor=cfg.rope_scaling_factor)
  elif cfg.rope_scaling == 'llama3':
    rope_scaling = dict(
      rope_type='llama3',
      factor=cfg.rope_scaling_factor,
      low_freq_factor=cfg.rope_low_freq_factor,
      high_freq_factor=cfg.rope_high_freq_factor,
      original_max_position_embeddings=cfg.rope_original_max_seq_len,
    )
  return dict(rope_theta=cfg.rope_theta, rope_scaling=rope_scaling)


def decoder_config_to_hf(cfg: ModelConfig, architecture: str, model_type: str, d_ff: int) -> dict:
  """The `config.json` keys Llama, Mixtral and Qwen3-MoE share (`d_ff`: intermediate_size)."""
  return dict(
    architectures=[architecture],
    model_type=model_type,
    vocab_size=cfg.vocab_size,
    hidden_size=cfg.d_model,
    intermediate_size=d_ff,
    num_hidden_layers=cfg.num_layers,
    num_attention_heads=cfg.num_heads,
    num_key_value_heads=cfg.num_kv_heads,
    head_dim=cfg.head_dim,
    max_position_embeddings=cfg.max_seq_len,
    rms_norm_eps=cfg.norm_eps,
    **rope_to_hf(cfg),
    hidden_act='silu',
    tie_word_embeddings=cfg.tie_embeddings,
    initializer_range=cfg.init_std,
  )


def config_to_hf(cfg: ModelConfig, biases: dict[str, bool]) -> dict:
  """A Llama `config.json`, in the transformers 4 RoPE format that transformers 5 also reads."""
  return dict(
    **decoder_config_to_hf(cfg, ARCHITECTURE, MODEL_TYPE, cfg.d_ff),
    attention_bias=biases['attn'],
    mlp_bias=biases['mlp'],
  )


def expected_names(hf: dict, cfg: ModelConfig, present: frozenset[str]) -> set[str]:
  """Tensor names a checkpoint with this config must hold (`present`: unused, one layout)."""
  del present
  mlp = [f'mlp.{m}.weight' for m in _MLP]
  if hf.get('mlp_bias', False):
    mlp += [f'mlp.{m}.bias' for m in _MLP]
  return decoder_names(hf, cfg, [mlp] * cfg.num_layers)


def decoder_names(hf: dict, cfg: ModelConfig, mlps: list[list[str]]) -> set[str]:
  """All tensor names, given each layer's MLP (or experts') names relative to the layer."""
  names = outer_names(cfg)
  attention = attention_names(hf, cfg)
  for i, mlp in enumerate(mlps):
    names.update(f'model.layers.{i}.{n}' for n in attention + mlp)
  return names


def outer_names(cfg: ModelConfig) -> set[str]:
  """The tensors outside the layers: embedding, final norm, and untied, lm_head."""
  return {'model.embed_tokens.weight', 'model.norm.weight'} | (
    set() if cfg.tie_embeddings else {'lm_head.weight'}
  )


def attention_names(hf: dict, cfg: ModelConfig) -> list[str]:
  """A layer's norms and attention tensors, relative to `model.layers.{i}.`."""
  names = [*_NORMS, *(f'self_attn.{k}_proj.weight' for k in _ATTN)]
  if hf.get('attention_bias', False):
    names += [f'self_attn.{k}_proj.bias' for k in _ATTN]
  if cfg.qk_norm:
    names += ['self_attn.q_norm.weight', 'self_attn.k_norm.weight']
  return names


def canonical_name(name: str, cfg: ModelConfig) -> str | None:
  """The name `expected_names` uses, or None for tensors that carry no weights."""
  if _BUFFERS.search(name) or (name == 'lm_head.weight' and cfg.tie_embeddings):
    return None
  return name


def to_ours(
  name: str, w: np.ndarray, cfg: ModelConfig
) -> list[tuple[tuple, int | None, np.ndarray]]:
  """One Hugging Face tensor -> [(our path, layer or None, array)]."""
  D, H = cfg.d_model, cfg.head_dim
  if name == 'model.embed_tokens.weight':
    return [(('embedding',), None, w)]
  if name == 'model.norm.weight':
    return [(('final_norm', 'scale'), None, w)]
  if name == 'lm_head.weight':
    return [(('unembed',), None, w.T)]
  i, rest = _LAYER.match(name).groups()
  i = int(i)
  if rest in _NORMS:
    return [((_NORMS[rest], 'scale'), i, w)]
  module, proj, param = rest.split('.')
  if proj in ('q_norm', 'k_norm'):
    return [(('attn', proj, 'scale'), i, w)]
  if module == 'self_attn':
    k = proj[0]
    heads = cfg.num_heads if k in 'qo' else cfg.num_kv_heads
    if param == 'bias':
      shape = (D,) if k == 'o' else (heads, H)
      return [(('attn', f'{k}_bias'), i, w.reshape(shape))]
    if k == 'o':
      return [(('attn', 'o'), i, w.T.reshape(heads, H, D))]
    return [(('attn', k), i, w.T.reshape(D, heads, H))]
  ours = _MLP[proj]
  if param == 'weight':
    return [(('mlp', ours), i, w.T)]
  if ours == 'wg':
    if np.any(w != 0):
      raise ValueError(
        f'{name} is nonzero, but the model has no gate bias (SwiGLU biases only wi and wo).'
      )
    return []
  return [(('mlp', f'{ours}_bias'), i, w)]


def to_hf(
  cfg: ModelConfig, get: Callable[[tuple, int | None], np.ndarray], biases: dict[str, bool]
) -> Iterator[tuple[str, np.ndarray]]:
  """(Hugging Face name, array) for every tensor, reading ours through `get(path, layer)`.

  `biases['attn']` / `biases['mlp']` say which bias groups to write.
  """
  return decoder_to_hf(cfg, get, biases, lambda i: mlp_to_hf(get, biases, i))


def decoder_to_hf(
  cfg: ModelConfig,
  get: Callable[[tuple, int | None], np.ndarray],
  biases: dict[str, bool],
  layer_mlp: Callable[[int], Iterator[tuple[str, np.ndarray]]],
) -> Iterator[tuple[str, np.ndarray]]:
  """Every tensor, with layer i's MLP (or experts) from `layer_mlp(i)`."""
  yield 'model.embed_tokens.weight', get(('embedding',), None)
  for i in range(cfg.num_layers):
    yield from attention_to_hf(cfg, get, biases, i)
    yield from layer_mlp(i)
  yield from head_to_hf(cfg, get)


def attention_to_hf(
  cfg: ModelConfig, get: Callable[[tuple, int | None], np.ndarray], biases: dict, i: int
) -> Iterator[tuple[str, np.ndarray]]:
  """Layer i's norms and attention (with Qwen3's QK-norm when `cfg.qk_norm`)."""
  D, p = cfg.d_model, f'model.layers.{i}.'
  yield p + 'input_layernorm.weight', get(('attn_norm', 'scale'), i)
  for k in _ATTN:
    w = get(('attn', k), i)
    w = w.reshape(-1, D).T if k == 'o' else w.reshape(D, -1).T
    yield p + f'self_attn.{k}_proj.weight', w
    if biases['attn']:
      yield p + f'self_attn.{k}_proj.bias', get(('attn', f'{k}_bias'), i).reshape(-1)
  if cfg.qk_norm:
    for k in 'qk':
      yield p + f'self_attn.{k}_norm.weight', get(('attn', f'{k}_norm', 'scale'), i)
  yield p + 'post_attention_layernorm.weight', get(('mlp_norm', 'scale'), i)


def mlp_to_hf(
  get: Callable[[tuple, int | None], np.ndarray], biases: dict, i: int
) -> Iterator[tuple[str, np.ndarray]]:
  """Layer i's dense SwiGLU MLP."""
  p = f'model.layers.{i}.'
  for proj, ours in _MLP.items():
    w = get(('mlp', ours), i)
    yield p + f'mlp.{proj}.weight', w.T
    if biases['mlp']:
      bias = np.zeros(w.shape[1], w.dtype) if ours == 'wg' else get(('mlp', f'{ours}_bias'), i)
      yield p + f'mlp.{proj}.bias', bias


def head_to_hf(
  cfg: ModelConfig, get: Callable[[tuple, int | None], np.ndarray]
) -> Iterator[tuple[str, np.ndarray]]:
  """The final norm and, untied, the output projection."""
  yield 'model.norm.weight', get(('final_norm', 'scale'), None)
  if not cfg.tie_embeddings:
    yield 'lm_head.weight', get(('unembed',), None).T
