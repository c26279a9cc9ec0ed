"""Splash attention: jax's Pallas TPU kernel (forward and backward), fitted to the model.

Dims: B batch, T query positions, S key/value positions, N query heads, K kv
heads, G = N // K, H head dim.

The kernel (`jax.experimental.pallas.ops.tpu.splash_attention`) keeps the
FlashAttention memory profile on TPUs: it saves its output and log-sum-exp
and recomputes each block's weights in its own dq and dkv kernels, skipping
the blocks the causal mask leaves empty. What this module adds:

- Layout: [B, T, N, H] in, heads before positions for the kernel, GQA through
  its multi-head form (query head n reads kv head n // G, as `N = K x G`
  groups them here). The logits scale goes onto q, which the kernel does not
  scale.
- Masks: causality is the kernel's (by array index: `make_mask`'s causality
  by position whenever positions count up within each document, as packing
  and `Transformer`'s defaults produce), documents its segment ids. Padding
  (segment id 0) attends to the other padding positions, so that no row is
  empty, and the caller zeroes those outputs (`kernels.attention_kernel`).
- Tiling: T is padded up to a multiple of 128 with padding positions, and the
  blocks are the largest of 512, 256, 128 that divide it. Any head dim works
  (XLA pads it to the 128 lanes, so 64 costs the matmul work of 128).
- Sharding: Pallas calls are not partitioned by XLA, so the kernel runs per
  device on its rows and heads (`sharding.per_shard`). With the length split
  too (context parallelism), `context_attention` is the per-device kernel:
  the row arrives in `sharding.balance_order`, and since causality here is by
  array index it puts the keys back in natural order and runs each of its two
  query chunks with the causal mask shifted to where the chunk sits.
- Remat: the kernel names its log-sum-exp 'attention_lse'
  (`residual_checkpoint_name`). Under 'minimal' and 'dots_saveable'
  (`jax.ad_checkpoint.print_saved_residuals`) its output [B, N, T, H] and
  log-sum-exp are saved, so the backward pass runs only the dq and dkv
  kernels; under 'full' nothing is, and it runs the forward kernel again.

On a CPU the kernel runs with `interpret=True` (tests only: slow, but the same
kernel code).
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash_lib

from llm import sharding

LANES = 128  # The kernel's tiles: block sizes are multiples of this.
_BLOCKS = (512, 256, 128)


def block_size(T: int) -> int:
  """The kernel's query and key block for a (padded) length T, a multiple of 128."""
  return next(b for b in _BLOCKS if T % b == 0)


def attention(
  q_BTKGH: jax.Array,
  k_BSKH: jax.Array,
  v_BSKH: jax.Array,
  segment_ids_BT: jax.Array | None,
  *,
  causal: bool,
  interpret: bool = False,
) -> jax.Array:
  """Self-attention [B, T, K, G, H]; rows of padding (segment id 0) are left to the caller."""
  B, T, K, G, H = q_BTKGH.shape
  if segment_ids_BT is None:
    segment_ids_BT = jnp.ones((B, T), jnp.int32)
  pad = -T % LANES
  if pad:
    q_BTKGH, k_BSKH, v_BSKH, segment_ids_BT = (
      jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
      for x in (q_BTKGH, k_BSKH, v_BSKH, segment_ids_BT)
    )

  def local(q_BNTH, k_BKSH, v_BKSH, segment_ids_BT):
    T = q_BNTH.shape[2]
    head_mask = splash_lib.CausalMask((T, T)) if causal else splash_lib.FullMask((T, T))
    return _splash(q_BNTH, k_BKSH, v_BKSH, segment_ids_BT, segment_ids_BT, head_mask, interpret)

  heads = ('act_batch', 'act_heads', None, None)
  kv_heads = ('act_batch', 'act_kv_heads', None, None)
  run = sharding.per_shard(local, (heads, kv_heads, kv_heads, ('act_batch', None)), heads)
  out_BNTH = run(*_heads_first(q_BTKGH, k_BSKH, v_BSKH), segment_ids_BT.astype(jnp.int32))
  return _positions_first(out_BNTH, K)[:, :T]


def context_attention(
  q_BTKGH: jax.Array,
  k_BSKH: jax.Array,
  v_BSKH: jax.Array,
  q_segment_ids_BT: jax.Array,
  kv_segment_ids_BS: jax.Array,
  shard: jax.Array,
  *,
  shards: int,
  causal: bool,
  interpret: bool = False,
) -> jax.Array:
  """One device's queries over the whole row, the length split over `shards` devices.

  Runs per device (inside a shard_map): q [B, 2c, K, G, H] is this shard's two
  chunks of c positions, natural chunks `shard` and 2 x shards - 1 - shard in
  that order; k, v [B, 2c x shards, K, H] and `kv_segment_ids_BS` are the
  gathered row in `sharding.balance_order`; `shard` is a traced int32 scalar.
  Returns [B, 2c, K, G, H], rows of padding left to the caller.

  The kernel's masks are static, but where a chunk sits depends on the traced
  `shard`: a `lax.switch` over the shards picks the branch whose two kernels
  carry their chunks' causal offsets. Without causality the order of the row
  does not matter to segment ids, so one kernel takes the row as it comes.
  """
  T, S = q_BTKGH.shape[1], k_BSKH.shape[1]
  c = _chunk(S, shards)
  if 2 * c != T:
    raise ValueError(f'Context attention takes 2 x {c} queries per shard, got {T}.')
  K = k_BSKH.shape[2]
  q_BNTH, k_BKSH, v_BKSH = _heads_first(q_BTKGH, k_BSKH, v_BSKH)
  q_segment_ids_BT = q_segment_ids_BT.astype(jnp.int32)
  kv_segment_ids_BS = kv_segment_ids_BS.astype(jnp.int32)
  if not causal:
    full = splash_lib.FullMask((T, S))
    args = (q_BNTH, k_BKSH, v_BKSH, q_segment_ids_BT, kv_segment_ids_BS)
    return _positions_first(_splash(*args, full, interpret), K)
  # The slots of the load-balanced row that hold natural chunks 0, 1, ...
  slots = np.argsort(sharding.balance_order(2 * shards, shards))
  natural = lambda x, axis: jnp.concatenate(
    [jax.lax.slice_in_dim(x, s * c, (s + 1) * c, axis=axis) for s in slots], axis=axis
  )
  k_BKSH, v_BKSH = natural(k_BKSH, 2), natural(v_BKSH, 2)
  kv_segment_ids_BS = natural(kv_segment_ids_BS, 1)

  def branch(i: int):
    def run(q_BNTH, k_BKSH, v_BKSH, q_segment_ids_BT, kv_segment_ids_BS):
      halves = []
      for half, chunk in enumerate((i, 2 * shards - 1 - i)):
        q_BNcH = q_BNTH[:, :, half * c : (half + 1) * c]
        q_segment_ids_Bc = q_segment_ids_BT[:, half * c : (half + 1) * c]
        mask = splash_lib.CausalMask((c, S), offset=chunk * c)
        args = (q_BNcH, k_BKSH, v_BKSH, q_segment_ids_Bc, kv_segment_ids_BS)
        halves.append(_splash(*args, mask, interpret))
      return jnp.concatenate(halves, axis=2)

    return run

  args = (q_BNTH, k_BKSH, v_BKSH, q_segment_ids_BT, kv_segment_ids_BS)
  out_BNTH = jax.lax.switch(shard, [branch(i) for i in range(shards)], *args)
  return _positions_first(out_BNTH, K)


def _chunk(seq_len: int, shards: int) -> int:
  """The positions of one of the row's 2 x shards chunks: the kernel's tiles must divide it."""
  c, rest = divmod(seq_len, 2 * shards)
  if rest or c % LANES:
    raise ValueError(
      f'seq_len={seq_len} split over mesh.sequence={shards} gives chunks of '
      f'{seq_len / (2 * shards):g} positions; splash needs chunks that are multiples of '
      f'{LANES}: make seq_len a multiple of {2 * shards * LANES} (or change mesh.sequence, '
      "or use model.attention_impl='blockwise')."
    )
  return c


def _heads_first(q_BTKGH, k_BSKH, v_BSKH):
  """The kernel's layout: q [B, N, T, H] times the logits scale, k and v [B, K, S, H]."""
  B, T, K, G, H = q_BTKGH.shape
  q_BTNH = q_BTKGH.reshape(B, T, K * G, H)
  q_BNTH = (q_BTNH.astype(jnp.float32) * H**-0.5).astype(q_BTNH.dtype).transpose(0, 2, 1, 3)
  return q_BNTH, k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)


def _positions_first(out_BNTH, K: int):
  """[B, N, T, H] from the kernel back to [B, T, K, G, H] (query head n = k x G + g)."""
  B, N, T, H = out_BNTH.shape
  return out_BNTH.transpose(0, 2, 1, 3).reshape(B, T, K, N // K, H)


def _splash(q_BNTH, k_BKSH, v_BKSH, q_segment_ids_BT, kv_segment_ids_BS, head_mask, interpret):
  """The kernel on this device's rows and heads, every head under `head_mask` [T, S]."""
  N, T = q_BNTH.shape[1:3]
  bq, bkv = block_size(T), block_size(k_BKSH.shape[2])
  kernel = splash_lib.make_splash_mha(
    splash_lib.MultiHeadMask([head_mask] * N),
    block_sizes=splash_lib.BlockSizes(
      block_q=bq,
      block_kv=bkv,
      block_kv_compute=bkv,
      block_q_dkv=bq,
      block_kv_dkv=bkv,
      block_kv_dkv_compute=bkv,
      block_q_dq=bq,
      block_kv_dq=bkv,
    ),
    head_shards=1,
    q_seq_shards=1,
    residual_checkpoint_name='attention_lse',
    interpret=interpret,
  )
  segments = splash_lib.SegmentIds(q=q_segment_ids_BT, kv=kv_segment_ids_BS)
  return jax.vmap(kernel)(q_BNTH, k_BKSH, v_BKSH, segment_ids=segments)
