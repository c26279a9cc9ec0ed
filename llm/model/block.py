"""The residual block, its remat policies, and the stack of layers.

A stack is runs of identical units (`groups`), each run one `nn.scan`: a
dense model is one run of dense blocks (params `layers`, stacked [L, ...]); a
mixture of experts with moe_first_dense=k adds a run of k dense blocks
(`dense_layers`) before the sparse ones, and with moe_every=n > 1 each unit is
n blocks, the last sparse (`layers/block_0 .. block_{n-1}`). Unrolled, layer i
is always `layers_{i}` (`unstack_layers` maps one layout onto the other).
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm import config as config_lib
from llm.config import ModelConfig
from llm.model import layers, moe

Array = jax.Array
BTD = layers.BTD


class Block(nn.Module):
  """Residual block. Pre-norm: x + attn(norm(x)), then x + mlp(norm(x)).
  Post-norm (BERT): norm(x + attn(x)), then norm(x + mlp(x)).

  The signature `(carry, *xs) -> (carry, ys)` is what `nn.scan` wants, so the
  same class serves the scanned and the unrolled stack: ys is the routing
  statistics in training (`moe.STATS`, zeros for a dense block, so that every
  block returns the same) and this layer's updated KV cache when decoding
  (see `Attention`). `sparse`: the MLP is a mixture of experts.
  """

  cfg: ModelConfig
  sparse: bool = False

  @nn.compact
  def __call__(
    self,
    x_BTD: Array,
    positions_BT: Array,
    segment_ids_BT: Array | None,
    cache: dict | None = None,
    cache_step: dict | None = None,
  ):
    x_BTD = layers.constrain(x_BTD, BTD)
    pre = self.cfg.norm_position == 'pre'
    attn_norm = layers.Norm(self.cfg, name='attn_norm')
    mlp_norm = layers.Norm(self.cfg, name='mlp_norm')
    h_BTD = attn_norm(x_BTD) if pre else x_BTD
    attn = layers.Attention(self.cfg, name='attn')
    if cache is None:
      x_BTD = x_BTD + attn(h_BTD, positions_BT, segment_ids_BT)
    else:
      attn_BTD, cache = attn(h_BTD, positions_BT, segment_ids_BT, cache, cache_step)
      x_BTD = x_BTD + attn_BTD
    if not pre:
      x_BTD = attn_norm(x_BTD)
    h_BTD = mlp_norm(x_BTD) if pre else x_BTD
    if self.sparse:
      valid_BT = jnp.ones(x_BTD.shape[:2]) if segment_ids_BT is None else segment_ids_BT > 0
      h_BTD, stats = moe.Moe(self.cfg, name='moe')(h_BTD, valid_BT)
    else:
      h_BTD, stats = layers.Mlp(self.cfg, name='mlp')(h_BTD), moe.zero_stats()
    x_BTD = x_BTD + h_BTD if pre else mlp_norm(x_BTD + h_BTD)
    return layers.constrain(x_BTD, BTD), (stats if cache is None else cache)


# What the fused attention kernels save for their backward pass, by checkpoint
# name: the output and log-sum-exp, O(T) per head (llm/model/flash.py names
# both, splash its log-sum-exp). Saved, they spare the backward pass a second
# run of the forward kernel; the kernels recompute their blocks either way.
_policies = jax.checkpoint_policies
_ATTENTION_RESIDUALS = _policies.save_only_these_names('attention_out', 'attention_lse')

REMAT_POLICIES = {
  # Save nothing: recompute the whole block, attention's forward kernel
  # included, in the backward pass. Least memory.
  'full': None,
  # Save every matmul output (with the xla kernel the T^2 attention scores too)
  # and the kernels' residuals; recompute only elementwise ops. Most memory.
  'dots_saveable': _policies.save_from_both_policies(_policies.dots_saveable, _ATTENTION_RESIDUALS),
  # Save weight matmul outputs (no batch dims in the contraction) and the
  # kernels' O(T) residuals, but recompute attention scores, whose size grows with T^2.
  'minimal': _policies.save_from_both_policies(
    _policies.dots_with_no_batch_dims_saveable, _ATTENTION_RESIDUALS
  ),
}


assert tuple(REMAT_POLICIES) == config_lib.REMAT_POLICIES  # One list of names, one of policies.


def block_class(cfg: ModelConfig) -> type[nn.Module]:
  """`Block`, wrapped in `nn.remat` per `cfg.remat` ('none' leaves it alone)."""
  if cfg.remat == 'none':
    return Block
  return nn.remat(
    Block,
    policy=REMAT_POLICIES[cfg.remat],
    # Under scan the loop boundary already stops XLA from merging recomputation
    # with the forward pass; outside it, prevent_cse keeps remat effective.
    prevent_cse=not cfg.scan_layers,
    static_argnums=(),
  )


class Group(NamedTuple):
  """A run of identical units: its params' name, the units, which blocks of a unit are sparse."""

  name: str
  repeats: int
  sparse: tuple[bool, ...]


def groups(cfg: ModelConfig) -> tuple[Group, ...]:
  """The layers as runs of identical units, in order (see the module docstring)."""
  if not cfg.num_experts:
    return (Group('layers', cfg.num_layers, (False,)),)
  k, n = cfg.moe_first_dense, cfg.moe_every
  body = Group('layers', (cfg.num_layers - k) // n, (False,) * (n - 1) + (True,))
  return ((Group('dense_layers', k, (False,)),) if k else ()) + (body,)


class Unit(nn.Module):
  """Blocks applied in turn, scanned as one: `Block`'s signature, caches stacked [n, ...]."""

  cfg: ModelConfig
  sparse: tuple[bool, ...]

  @nn.compact
  def __call__(self, x_BTD, positions_BT, segment_ids_BT, cache=None, cache_step=None):
    out = []
    for j, sparse in enumerate(self.sparse):
      block = block_class(self.cfg)(self.cfg, sparse=sparse, name=f'block_{j}')
      if cache is None:
        x_BTD, stats = block(x_BTD, positions_BT, segment_ids_BT)
        out.append(stats)
      else:
        one = jax.tree.map(lambda c, j=j: c[j], cache)
        x_BTD, kv = block(x_BTD, positions_BT, segment_ids_BT, one, cache_step)
        out.append(kv)
    if cache is None:
      return x_BTD, jax.tree.map(lambda *s: sum(s), *out)
    return x_BTD, jax.tree.map(lambda *c: jnp.stack(c), *out)


def unit_class(cfg: ModelConfig, group: Group):
  """(module class, its extra attributes) of one unit of `group`."""
  if len(group.sparse) == 1:
    return block_class(cfg), {'sparse': group.sparse[0]}
  return Unit, {'sparse': group.sparse}


def mean_stats(stats: dict, cfg: ModelConfig) -> dict:
  """Routing statistics summed over the layers -> their means over the sparse ones."""
  sparse = max(1, sum(cfg.sparse_layers()))
  return {k: v / sparse for k, v in stats.items()}
