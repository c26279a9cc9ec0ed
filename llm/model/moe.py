"""Mixture of experts: the router, two dispatch paths, and the routing statistics.

Dims legend beyond `llm/model/__init__.py`'s: E experts, R routes per token
(the top k), C capacity slots per expert and row, M tokens of a batch
flattened (B x T), P token copies (M x R), in the order of their experts.

A sparse layer replaces the block's MLP: a float32 router scores every
expert, each token goes to its top R, and its output is the routed experts'
outputs weighted by their router probabilities, plus the shared experts'
(always active). Two ways to send tokens to experts:

  dropless  (capacity_factor 0) the token copies are sorted by expert and each
            expert multiplies its own contiguous rows (`lax.ragged_dot`): no
            token is ever dropped, and no FLOP is spent on padding.
  capacity  each expert takes at most C = ceil(T x R / E x capacity_factor)
            copies of each row, in order of route rank then position (every
            token's first choice before any second one); the rest are dropped
            (the layer adds nothing for them, the residual carries them on).
            One-hot dispatch and combine einsums: static shapes, the classic
            GShard / Switch layout.

With nothing dropped (capacity_factor = E) both compute the same sums. The
experts run inside `sharding.expert_parallel`, split over the `expert` axis.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm import sharding
from llm.config import ModelConfig
from llm.model import layers

Array = jax.Array

# The routing statistics of a block, each a mean over the batch's real tokens:
# the load-balancing loss (Switch: E x sum_e f_e p_e, where f_e is the share of
# token copies routed to expert e and p_e its mean router probability; 1 when
# balanced), the router z-loss (mean squared log-sum-exp of the router logits),
# the share of token copies dropped by the capacity limit, and the busiest
# expert's load over the mean load. Dense blocks report zeros.
STATS = ('moe_aux_loss', 'router_z_loss', 'dropped_fraction', 'expert_load_max_over_mean')


def zero_stats() -> dict:
  return {name: jnp.zeros((), jnp.float32) for name in STATS}


def capacity(cfg: ModelConfig, seq_len: int) -> int:
  """Slots per expert and row of the capacity path."""
  R, E = cfg.experts_per_token, cfg.num_experts
  return max(1, math.ceil(seq_len * R / E * cfg.capacity_factor))


class Moe(nn.Module):
  """A mixture-of-experts MLP: x_BTD, valid_BT (1 on real tokens) -> (out_BTD, stats)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD: Array, valid_BT: Array) -> tuple[Array, dict]:
    cfg = self.cfg
    D, E, F, R = cfg.d_model, cfg.num_experts, cfg.expert_d_ff, cfg.experts_per_token
    init = nn.initializers.normal(cfg.init_std)
    out_init = nn.initializers.normal(cfg.init_std / (2 * cfg.num_layers) ** 0.5)
    router_DE = layers._param(self, 'router', (D, E), ('embed', None), init, cfg)
    logits_BTE = jnp.einsum('BTD,DE->BTE', x_BTD.astype(jnp.float32), router_DE.astype(jnp.float32))
    probs_BTE = jax.nn.softmax(logits_BTE, axis=-1)
    weights_BTR, experts_BTR = jax.lax.top_k(probs_BTE, R)
    if cfg.router_renormalize:
      weights_BTR /= jnp.sum(weights_BTR, axis=-1, keepdims=True)

    in_axes, out_axes = ('exp', 'exp_embed', 'mlp'), ('exp', 'mlp', 'exp_embed')
    experts = [layers._param(self, 'wi', (E, D, F), in_axes, init, cfg)]
    if cfg.mlp == 'swiglu':
      experts.append(layers._param(self, 'wg', (E, D, F), in_axes, init, cfg))
    experts.append(layers._param(self, 'wo', (E, F, D), out_axes, out_init, cfg))
    experts = tuple(w.astype(cfg.dtype) for w in experts)

    valid_BT = valid_BT.astype(jnp.float32)
    routes = (experts_BTR, weights_BTR.astype(cfg.dtype))
    if cfg.capacity_factor:
      slots_BTR = _slots(experts_BTR, valid_BT, E, capacity(cfg, x_BTD.shape[1]))
      fn = functools.partial(_capacity_experts, cfg, capacity(cfg, x_BTD.shape[1]))
      routes += (slots_BTR,)
      dropped = jnp.sum((slots_BTR < 0) * valid_BT[..., None])
    else:  # Padding goes to no expert: it takes no buffer room.
      routes = (jnp.where(valid_BT[..., None] > 0, experts_BTR, E), routes[1])
      fn, dropped = functools.partial(_dropless_experts, cfg), jnp.zeros(())
    out_BTD, overflow = sharding.expert_parallel(fn, x_BTD.astype(cfg.dtype), routes, experts)
    dropped += overflow
    if cfg.num_shared_experts:
      shared = layers.Mlp(cfg, features=cfg.num_shared_experts * F, name='shared')
      out_BTD += shared(x_BTD)
    stats = _stats(logits_BTE, probs_BTE, experts_BTR, valid_BT, dropped)
    return layers.constrain(out_BTD.astype(cfg.dtype), layers.BTD), stats


def _stats(logits_BTE, probs_BTE, experts_BTR, valid_BT, dropped) -> dict:
  E, R = probs_BTE.shape[-1], experts_BTR.shape[-1]
  tokens = jnp.maximum(jnp.sum(valid_BT), 1.0)
  routed_E = jnp.einsum('BTRE,BT->E', jax.nn.one_hot(experts_BTR, E), valid_BT)
  share_E = routed_E / (tokens * R)
  prob_E = jnp.einsum('BTE,BT->E', probs_BTE, valid_BT) / tokens
  log_z_BT = jax.nn.logsumexp(logits_BTE, axis=-1)
  mean_load = jnp.maximum(jnp.mean(routed_E), 1e-9)
  return {
    'moe_aux_loss': E * jnp.sum(share_E * prob_E),
    'router_z_loss': jnp.sum(jnp.square(log_z_BT) * valid_BT) / tokens,
    'dropped_fraction': dropped / (tokens * R),
    'expert_load_max_over_mean': jax.lax.stop_gradient(jnp.max(routed_E) / mean_load),
  }


def _slots(experts_BTR: Array, valid_BT: Array, E: int, C: int) -> Array:
  """Each token copy's slot in its expert's queue for its row, or -1 when dropped.

  Copies queue by route rank first, then position, so a token's first choice
  is only dropped once every first choice of its row ahead of it is in.
  Padding never takes a slot.
  """
  B, T, R = experts_BTR.shape
  onehot_BTRE = jax.nn.one_hot(experts_BTR, E, dtype=jnp.int32) * valid_BT[..., None, None].astype(
    jnp.int32
  )
  queue_BPE = jnp.swapaxes(onehot_BTRE, 1, 2).reshape(B, R * T, E)  # Rank-major order.
  position_BPE = jnp.cumsum(queue_BPE, axis=1) - 1
  position_BTR = jnp.swapaxes(jnp.sum(position_BPE * queue_BPE, axis=-1).reshape(B, R, T), 1, 2)
  keep_BTR = (position_BTR < C) & (valid_BT[..., None] > 0)
  return jnp.where(keep_BTR, position_BTR, -1)


def _expert_mlp(cfg: ModelConfig, dot, x, experts: tuple) -> Array:
  """The model's MLP kind on each expert's rows; `dot(x, w)` applies one weight per expert."""
  h = dot(x, experts[0])
  if cfg.mlp == 'swiglu':
    h = nn.silu(dot(x, experts[1])) * h
  else:
    h = layers.activation(cfg, h)
  return dot(h.astype(cfg.dtype), experts[-1])


def _dropless_experts(cfg: ModelConfig, x_BTD, experts_BTR, weights_BTR, *args):
  """This chip's experts' outputs per token, and the copies its buffer had no room for.

  The copies of the tokens here (an expert group's, under expert parallelism)
  are sorted by expert, this chip's first; the first N of them, N at most the
  `expert_buffer_factor` bound, go through `ragged_dot` and are added back
  onto their tokens, so no buffer is larger than N rows.
  """
  *experts, first = args
  B, T, D = x_BTD.shape
  R, e = experts_BTR.shape[-1], experts[0].shape[0]
  P = B * T * R
  N = P
  if cfg.expert_buffer_factor:
    N = min(P, math.ceil(P * e / cfg.num_experts * cfg.expert_buffer_factor))
  local_P = experts_BTR.reshape(-1) - first
  mine_P = (local_P >= 0) & (local_P < e)
  key_P = jnp.where(mine_P, local_P, e)  # Other chips' experts sort last, in no group.
  order_N = jnp.argsort(key_P, stable=True)[:N]
  ends_E = jnp.minimum(jnp.cumsum(jnp.bincount(key_P, length=e + 1)[:e]), N)
  sizes_E = jnp.diff(ends_E, prepend=0).astype(jnp.int32)
  token_N = order_N // R
  x_ND = x_BTD.reshape(B * T, D)[token_N]

  def dot(x_NF, w_EFG):
    out = jax.lax.ragged_dot(x_NF, w_EFG, sizes_E, preferred_element_type=jnp.float32)
    return out.astype(cfg.dtype)

  kept_N = jnp.arange(N) < ends_E[-1]
  weight_N = jnp.where(kept_N, weights_BTR.reshape(-1)[order_N], 0).astype(cfg.dtype)
  y_ND = _expert_mlp(cfg, dot, x_ND, experts) * weight_N[:, None]
  out_MD = jnp.zeros((B * T, D), y_ND.dtype).at[token_N].add(y_ND)
  dropped = jnp.sum(mine_P) - ends_E[-1]
  return out_MD.reshape(B, T, D), dropped.astype(jnp.float32)


def _capacity_experts(cfg: ModelConfig, C: int, x_BTD, experts_BTR, weights_BTR, slots_BTR, *args):
  """This chip's experts' outputs per token (one-hot dispatch into C slots per row), and 0."""
  *experts, first = args
  e = experts[0].shape[0]
  local_BTR = experts_BTR - first
  mine_BTR = (local_BTR >= 0) & (local_BTR < e) & (slots_BTR >= 0)
  onehot_BTReC = (
    jax.nn.one_hot(jnp.where(mine_BTR, local_BTR, -1), e, dtype=cfg.dtype)[..., None]
    * jax.nn.one_hot(slots_BTR, C, dtype=cfg.dtype)[..., None, :]
  )
  dispatch_BTEC = jnp.sum(onehot_BTReC, axis=2)
  combine_BTEC = jnp.einsum('BTREC,BTR->BTEC', onehot_BTReC, weights_BTR.astype(cfg.dtype))
  x_EBCD = layers.matmul(cfg, 'BTD,BTEC->EBCD', x_BTD, dispatch_BTEC)

  def dot(x_EBCF, w_EFG):
    return layers.matmul(cfg, 'EBCF,EFG->EBCG', x_EBCF, w_EFG)

  y_EBCD = _expert_mlp(cfg, dot, x_EBCD, experts)
  out_BTD = layers.matmul(cfg, 'EBCD,BTEC->BTD', y_EBCD, combine_BTEC)
  return out_BTD, jnp.zeros((), jnp.float32)  # Its drops are counted from the slots.
