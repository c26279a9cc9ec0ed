"""Qwen3-MoE (`Qwen3MoeForCausalLM`) <-> `Transformer` with QK-norm and routed experts.

Qwen3-MoE is Llama's layers (`llm/convert/llama.py`, reused here) plus an
RMSNorm over head_dim on every query and key head before RoPE
(`self_attn.{q,k}_norm.weight` [H] <-> attn/{q,k}_norm/scale, `qk_norm=True`),
with some MLPs replaced by routed SwiGLU experts (`mlp.experts.{j}.{gate,up,
down}_proj`, `llm/convert/experts.py`) of width `moe_intermediate_size`;
the others are dense MLPs of width `intermediate_size`. `norm_topk_prob` is
`router_renormalize`.

Hugging Face picks the sparse layers as those not in `mlp_only_layers` whose
index + 1 is a multiple of `decoder_sparse_step`; ours are every
`moe_every`-th after `moe_first_dense` dense ones, so import finds the
(moe_first_dense, moe_every) that gives the same layers, or refuses, and
export writes the same pattern back (always expressible). Qwen3-MoE has no
shared experts and no MLP biases; `capacity_factor` is not saved
(transformers is dropless, and so is the imported model).
"""

import re
from collections.abc import Callable, Iterator

import numpy as np

from llm.convert import experts, llama
from llm.model import ModelConfig

ARCHITECTURE = 'Qwen3MoeForCausalLM'
MODEL_TYPE = 'qwen3_moe'
# Token ids that config.json records on export.
SPECIAL_TOKEN_IDS = ('bos', 'eos', 'pad')

_SPARSE = re.compile(r'^model\.layers\.(\d+)\.mlp\.(gate\.weight|experts\..+)$')
# The experts' and the dense MLPs' projections have the same names.
_PROJS = {'gate_proj': 'wg', 'up_proj': 'wi', 'down_proj': 'wo'}


def _sparse_pattern(hf: dict, num_layers: int, num_experts: int) -> tuple[int, int]:
  """(moe_first_dense, moe_every) that make the layers Hugging Face's config makes sparse."""
  only = sorted(hf.get('mlp_only_layers') or [])
  step = hf.get('decoder_sparse_step', 1)
  if step < 1:
    raise ValueError(f'Qwen3-MoE decoder_sparse_step={step} must be 1 or more.')
  sparse = tuple(
    num_experts > 0 and i not in only and (i + 1) % step == 0 for i in range(num_layers)
  )
  for every in range(1, num_layers + 1):
    for first in range(num_layers):
      ours = tuple(i >= first and (i - first + 1) % every == 0 for i in range(num_layers))
      if (num_layers - first) % every == 0 and ours == sparse:
        return first, every
  raise ValueError(
    f'Qwen3-MoE with num_experts={num_experts}, decoder_sparse_step={step} and '
    f'mlp_only_layers={only} makes layers {[i for i, s in enumerate(sparse) if s]} of '
    f'{num_layers} sparse, which this model cannot express: its sparse layers are every '
    'moe_every-th after moe_first_dense dense ones, the last layer among them.'
  )


def config_from_hf(hf: dict) -> dict:
  """ModelConfig fields from a Qwen3-MoE `config.json` (missing keys: Qwen3MoeConfig's defaults)."""
  llama.silu_only(hf, 'Qwen3-MoE')
  if hf.get('use_sliding_window', False):
    raise ValueError(
      'Qwen3-MoE use_sliding_window=true is not supported; attention here is global.'
    )
  # transformers 5 saves num_experts as num_local_experts (an attribute_map alias).
  num_experts = hf.get('num_experts', hf.get('num_local_experts', 128))
  num_layers = hf.get('num_hidden_layers', 24)
  first_dense, every = _sparse_pattern(hf, num_layers, num_experts)
  return dict(
    **llama.decoder_fields(
      hf,
      'Qwen3-MoE',
      vocab_size=151936,
      num_layers=num_layers,
      d_model=2048,
      d_ff=6144,
      max_seq_len=32768,
      norm_eps=1e-6,
    ),
    use_bias=bool(hf.get('attention_bias', False)),
    qk_norm=True,
    num_experts=num_experts,
    experts_per_token=hf.get('num_experts_per_tok', 8),
    moe_d_ff=hf.get('moe_intermediate_size', 768),
    moe_first_dense=first_dense,
    moe_every=every,
    router_renormalize=bool(hf.get('norm_topk_prob', False)),
  )


def check_exportable(cfg: ModelConfig) -> list[str]:
  """Reasons `cfg` cannot be written as Qwen3-MoE; empty when it can."""
  wants = llama.DECODER + (('qk_norm', True), ('num_shared_experts', 0))
  reasons = llama.mismatches(cfg, 'Qwen3-MoE', wants)
  if not cfg.num_experts:
    reasons.insert(0, 'model.num_experts=0 (Qwen3-MoE needs a mixture of experts)')
  return reasons


def config_to_hf(cfg: ModelConfig, biases: dict[str, bool]) -> dict:
  """A Qwen3-MoE `config.json`; the sparse layers as a step when they start at 0, else a list."""
  if biases['mlp']:
    raise ValueError(
      'The dense layers have nonzero MLP biases (model.use_bias=True), which Qwen3-MoE lacks.'
    )
  step = 1 if cfg.moe_first_dense else cfg.moe_every
  dense = [i for i, s in enumerate(cfg.sparse_layers()) if not s and (i + 1) % step == 0]
  return dict(
    **llama.decoder_config_to_hf(cfg, ARCHITECTURE, MODEL_TYPE, cfg.d_ff),
    moe_intermediate_size=cfg.expert_d_ff,
    attention_bias=biases['attn'],
    num_experts=cfg.num_experts,
    num_experts_per_tok=cfg.experts_per_token,
    norm_topk_prob=cfg.router_renormalize,
    decoder_sparse_step=step,
    mlp_only_layers=dense,
    use_sliding_window=False,
    sliding_window=None,
  )


def expected_names(hf: dict, cfg: ModelConfig, present: frozenset[str]) -> set[str]:
  """Tensor names a checkpoint with this config must hold, in the layout `present` uses."""
  dense = [f'mlp.{p}.weight' for p in _PROJS]
  sparse = experts.names('mlp', cfg.num_experts, _PROJS, experts.is_fused(present))
  return llama.decoder_names(hf, cfg, [sparse if s else dense for s in cfg.sparse_layers()])


# Qwen3-MoE names every tensor as Llama does.
canonical_name = llama.canonical_name


def to_ours(
  name: str, w: np.ndarray, cfg: ModelConfig
) -> list[tuple[tuple, int | None, np.ndarray]]:
  """One Hugging Face tensor -> [(our path, layer or None, array)]."""
  return experts.layer_to_ours(_SPARSE, name, w, cfg, _PROJS)


def to_hf(
  cfg: ModelConfig, get: Callable[[tuple, int | None], np.ndarray], biases: dict[str, bool]
) -> Iterator[tuple[str, np.ndarray]]:
  """(Hugging Face name, array) for every tensor, reading ours through `get(path, layer)`."""
  sparse = cfg.sparse_layers()

  def layer_mlp(i: int) -> Iterator[tuple[str, np.ndarray]]:
    if sparse[i]:
      return experts.to_hf(f'model.layers.{i}.mlp.', get, i, cfg.num_experts, _PROJS)
    return llama.mlp_to_hf(get, biases, i)

  return llama.decoder_to_hf(cfg, get, biases, layer_mlp)
