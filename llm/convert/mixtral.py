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
_PROJS = {'w1': 'wg', 'w3': 'wi', 'w2': 'wo'}


def config_from_hf(hf: dict) -> dict:
  """ModelConfig fields from a Mixtral `config.json` (missing keys: MixtralConfig's defaults)."""
  llama.silu_only(hf, 'Mixtral')
  if hf.get('router_jitter_noise', 0.0):
    raise ValueError(
      f'Mixtral router_jitter_noise={hf["router_jitter_noise"]} is not supported; only 0 is.'
    )
  if hf.get('sliding_window') is not None:
    raise ValueError(
      f'Mixtral sliding_window={hf["sliding_window"]} is not supported; attention here is global '
      '(sliding_window must be null).'
    )
  return dict(
    **llama.decoder_fields(
      hf,
      'Mixtral',
      vocab_size=32000,
      num_layers=32,
      d_model=4096,
      d_ff=14336,
      max_seq_len=4096 * 32,
      norm_eps=1e-5,
      default_theta=1e6,
    ),
    num_experts=hf.get('num_local_experts', 8),
    experts_per_token=hf.get('num_experts_per_tok', 2),
    router_renormalize=True,
  )


def check_exportable(cfg: ModelConfig) -> list[str]:
  """Reasons `cfg` cannot be written as Mixtral; empty when it can."""
  reasons = llama.mismatches(
    cfg,
    'Mixtral',
    llama.DECODER
    + (
      ('use_bias', False),
      ('qk_norm', False),
      ('num_shared_experts', 0),
      ('moe_first_dense', 0),
      ('moe_every', 1),
      ('router_renormalize', True),
    ),
  )
  if not cfg.num_experts:
    reasons.insert(0, 'model.num_experts=0 (Mixtral needs a mixture of experts)')
  return reasons


def config_to_hf(cfg: ModelConfig, biases: dict[str, bool]) -> dict:
  """A Mixtral `config.json` (biases is unused: Mixtral has none)."""
  del biases
  return dict(
    **llama.decoder_config_to_hf(cfg, ARCHITECTURE, MODEL_TYPE, cfg.expert_d_ff),
    num_local_experts=cfg.num_experts,
    num_experts_per_tok=cfg.experts_per_token,
    router_jitter_noise=0.0,
    sliding_window=None,
  )


def expected_names(hf: dict, cfg: ModelConfig, present: frozenset[str]) -> set[str]:
  """Tensor names a checkpoint with this config must hold, in the layout `present` uses."""
  sparse = experts.names(_MODULE, cfg.num_experts, _PROJS, experts.is_fused(present))
  return llama.decoder_names(hf, cfg, [sparse] * cfg.num_layers)


def canonical_name(name: str, cfg: ModelConfig) -> str | None:
  """The name `expected_names` uses, or None for tensors that carry no weights.

  transformers 5's state dict calls the experts' module `mlp`; on disk it is
  `block_sparse_moe` (Mixtral has no other `mlp`).
  """
  if llama.canonical_name(name, cfg) is None:
    return None
  return re.sub(r'^(model\.layers\.\d+)\.mlp\.', rf'\1.{_MODULE}.', name)


def to_ours(
  name: str, w: np.ndarray, cfg: ModelConfig
) -> list[tuple[tuple, int | None, np.ndarray]]:
  """One Hugging Face tensor -> [(our path, layer or None, array)]."""
  return experts.layer_to_ours(_SPARSE, name, w, cfg, _PROJS)


def to_hf(
  cfg: ModelConfig, get: Callable[[tuple, int | None], np.ndarray], biases: dict[str, bool]
) -> Iterator[tuple[str, np.ndarray]]:
  """(Hugging Face name, array) for every tensor, reading ours through `get(path, layer)`."""
  return llama.decoder_to_hf(
    cfg,
    get,
    biases,
    lambda i: experts.to_hf(f'model.layers.{i}.{_MODULE}.', get, i, cfg.num_experts, _PROJS),
  )
