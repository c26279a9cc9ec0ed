"""The model floor: the Transformer, its layers, attention and backend kernels.

Dims legend, used in tensor names (`x_BTD`) and einsum strings everywhere:

  B  batch                      T  query positions (sequence length)
  S  key/value positions        D  model width (d_model)
  F  MLP hidden width (d_ff)    N  query heads
  K  key/value heads            G  query heads per kv head (N // K)
  H  head dim                   V  vocabulary
  L  layers                     E  experts
  R  routes per token (top k)   C  capacity slots per expert and row
  M  tokens flattened (B x T)   P  token copies (M x R), sorted by expert

One `Transformer` covers every family by configuration, from shared blocks:
GPT-2/GPT-3 (learned positions, LayerNorm, GELU, biases, tied embeddings),
Llama (RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases, untied
output) and the BERT encoder (causal=False, post-LayerNorm with a LayerNorm on
the embeddings, token-type embeddings, exact GELU, and the masked-LM head:
dense + GELU + LayerNorm, then the tied decoder with a bias). `head` picks
the output: next-token logits ('lm'), masked-LM logits ('mlm'), or
`num_labels` class logits from one pooled position per row ('classifier').
Presets with published shapes are in `experiments/presets.py`.

Modules: `transformer` (the model, its KV cache, parameter layouts), `layers`
(norms, RoPE, attention and MLP layers), `block` (the residual block, remat, the
runs of layers the stack scans), `moe` (the mixture-of-experts MLP),
`attention` (masks and the reference computation), `kernels` (backend-specific
implementations, chosen from the mesh's platform), `flash` and `splash`
(memory-efficient attention: blockwise in plain JAX, and the Pallas TPU
kernel). `ModelConfig` lives in `llm/config.py`, the floor below.
"""

from llm.config import ModelConfig
from llm.model.kernels import resolve
from llm.model.transformer import (
  CACHE_AXES,
  Transformer,
  abstract_params,
  count_active_params,
  count_params,
  init_cache,
  param_shardings,
  stack_layers,
  unstack_layers,
)

__all__ = [
  'CACHE_AXES',
  'ModelConfig',
  'Transformer',
  'abstract_params',
  'count_active_params',
  'count_params',
  'init_cache',
  'param_shardings',
  'resolve',
  'stack_layers',
  'unstack_layers',
]
