"""Mixtral (`MixtralForCausalLM`) <-> `Transformer` with a mixture of experts in every layer.

Mixtral is Llama's attention and norms (`llm/convert/llama.py`, reused here)
with each MLP replaced by E SwiGLU experts (`block_sparse_moe`, per-expert
w1 = gate -> wg, w3 = up -> wi, w2 = down -> wo; `llm/convert/experts.py` has
the layouts). Its router is ours: a float32 softmax over all experts, the
top k, divided by their sum (`router_renormalize=True`). Mixtral has no
biases, no dense layers and no shared experts, so a model with any of them
cannot be written as Mixtral; `capacity_factor` is not saved (transformers is
dropless, and so is the imported model).
"""

import re
from collections.abc import Callable, Iterator

import numpy as np

from llm.convert import experts, llama
from llm.model import ModelConfig

ARCHITECTURE = 'MixtralForCausalLM'
MODEL_TYPE = 'mixtral'
# Token ids that config.json records on export.
SPECIAL_TOKEN_IDS = ('bos', 'eos', 'pad')

_MODULE = 'block_sparse_moe'
_SPARSE = re.compile(rf'^model\.layers\.(\d+)\.{_MODULE}\.(.+)$')
_BUFFERS = re.compile(r'rotary_emb\.inv_freq$')
_PROJS = {'w1': 'wg', 'w3': 'wi', 'w2': 'wo'}


def config_from_hf(hf: dict) -> dict:
  """ModelConfig fields from a Mixtral `config.json` (missing keys: MixtralConfig's defaults)."""
  act = hf.get('hidden_act', 'silu')
  if act != 'silu':
    raise ValueError(f'Mixtral hidden_act={act!r} is not supported; SwiGLU here uses silu.')
  if hf.get('router_jitter_noise', 0.0):
    raise ValueError(
      f'Mixtral router_jitter_noise={hf["router_jitter_noise"]} is not supported; only 0 is.'
    )
  if hf.get('sliding_window') is not None:
    raise ValueError(
      f'Mixtral sliding_window={hf["sliding_window"]} is not supported; attention here is global '
      '(sliding_window must be null).'
    )
  num_heads = hf.get('num_attention_heads', 32)
  d_model = hf.get('hidden_size', 4096)
  return dict(
    vocab_size=hf.get('vocab_size', 32000),
    num_layers=hf.get('num_hidden_layers', 32),
    d_model=d_model,
    num_heads=num_heads,
    num_kv_heads=hf.get('num_key_value_heads') or num_heads,
    head_dim=hf.get('head_dim') or d_model // num_heads,
    d_ff=hf.get('intermediate_size', 14336),
    max_seq_len=hf.get('max_position_embeddings', 4096 * 32),
    norm='rmsnorm',
    norm_eps=hf.get('rms_norm_eps', 1e-5),
    mlp='swiglu',
    position='rope',
    tie_embeddings=hf.get('tie_word_embeddings', False),
    init_std=hf.get('initializer_range', 0.02),
    num_experts=hf.get('num_local_experts', 8),
    experts_per_token=hf.get('num_experts_per_tok', 2),
    router_renormalize=True,
    **llama.rope_fields(hf, 'Mixtral', default_theta=1e6),
  )


def check_exportable(cfg: ModelConfig) -> list[str]:
  """Reasons `cfg` cannot be written as Mixtral; empty when it can."""
  reasons = [
    f'model.{field}={getattr(cfg, field)!r} (Mixtral needs {want!r})'
    for field, want in (
      ('norm', 'rmsnorm'),
      ('mlp', 'swiglu'),
      ('position', 'rope'),
      ('causal', True),
      ('norm_position', 'pre'),
      ('type_vocab_size', 0),
      ('head', 'lm'),
      ('use_bias', False),
      ('qk_norm', False),
      ('num_shared_experts', 0),
      ('moe_first_dense', 0),
      ('moe_every', 1),
      ('router_renormalize', True),
    )
    if getattr(cfg, field) != want
  ]
  if not cfg.num_experts:
    reasons.insert(0, 'model.num_experts=0 (Mixtral needs a mixture of experts)')
  return reasons


def config_to_hf(cfg: ModelConfig, biases: dict[str, bool]) -> dict:
  """A Mixtral `config.json` (biases is unused: Mixtral has none)."""
  del biases
  return dict(
    architectures=[ARCHITECTURE],
    model_type=MODEL_TYPE,
    vocab_size=cfg.vocab_size,
    hidden_size=cfg.d_model,
    intermediate_size=cfg.expert_d_ff,
    num_hidden_layers=cfg.num_layers,
    num_attention_heads=cfg.num_heads,
    num_key_value_heads=cfg.num_kv_heads,
    head_dim=cfg.head_dim,
    max_position_embeddings=cfg.max_seq_len,
    rms_norm_eps=cfg.norm_eps,
    **llama.rope_to_hf(cfg),
    hidden_act='silu',
    tie_word_embeddings=cfg.tie_embeddings,
    initializer_range=cfg.init_std,
    num_local_experts=cfg.num_experts,
    num_experts_per_tok=cfg.experts_per_token,
    router_jitter_noise=0.0,
    sliding_window=None,
  )


def expected_names(hf: dict, cfg: ModelConfig, present: frozenset[str]) -> set[str]:
  """Tensor names a checkpoint with this config must hold, in the layout `present` uses."""
  per_layer = llama.attention_names(hf, cfg)
  per_layer += experts.names(_MODULE, cfg.num_experts, _PROJS, experts.is_fused(present))
  names = llama.outer_names(cfg)
  for i in range(cfg.num_layers):
    names.update(f'model.layers.{i}.{n}' for n in per_layer)
  return names


def canonical_name(name: str, cfg: ModelConfig) -> str | None:
  """The name `expected_names` uses, or None for tensors that carry no weights.

  transformers 5's state dict calls the experts' module `mlp`; on disk it is
  `block_sparse_moe` (Mixtral has no other `mlp`).
  """
  if _BUFFERS.search(name) or (name == 'lm_head.weight' and cfg.tie_embeddings):
    return None
  return re.sub(r'^(model\.layers\.\d+)\.mlp\.', rf'\1.{_MODULE}.', name)


def to_ours(
  name: str, w: np.ndarray, cfg: ModelConfig
) -> list[tuple[tuple, int | None, np.ndarray]]:
  """One Hugging Face tensor -> [(our path, layer or None, array)]."""
  sparse = _SPARSE.match(name)
  if sparse:
    i, rest = sparse.groups()
    return experts.to_ours(name, rest, w, cfg, _PROJS, int(i))
  return llama.to_ours(name, w, cfg)


def to_hf(
  cfg: ModelConfig, get: Callable[[tuple, int | None], np.ndarray], biases: dict[str, bool]
) -> Iterator[tuple[str, np.ndarray]]:
  """(Hugging Face name, array) for every tensor, reading ours through `get(path, layer)`."""
  yield 'model.embed_tokens.weight', get(('embedding',), None)
  for i in range(cfg.num_layers):
    yield from llama.attention_to_hf(cfg, get, biases, i)
    yield from experts.to_hf(f'model.layers.{i}.{_MODULE}.', get, i, cfg.num_experts, _PROJS)
  yield from llama.head_to_hf(cfg, get)
