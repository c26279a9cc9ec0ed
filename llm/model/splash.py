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
  device on its rows and heads (`sharding.per_shard`); the sequence is not split.
- Remat: the kernel names its log-sum-exp 'attention_lse'
  (`residual_checkpoint_name`); its output is a Pallas result no policy here
  saves, so under remat the backward pass runs the forward kernel again.

On a CPU the kernel runs with `interpret=True` (tests only: slow, but the same
kernel code).
"""

import jax
import jax.numpy as jnp
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
  q_BTNH = q_BTKGH.reshape(B, T + pad, K * G, H)
  q_BNTH = (q_BTNH.astype(jnp.float32) * H**-0.5).astype(q_BTNH.dtype).transpose(0, 2, 1, 3)
  k_BKSH, v_BKSH = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)

  def local(q_BNTH, k_BKSH, v_BKSH, segment_ids_BT):
    N, T = q_BNTH.shape[1:3]  # This device's heads.
    head_mask = splash_lib.CausalMask((T, T)) if causal else splash_lib.FullMask((T, T))
    b = block_size(T)
    kernel = splash_lib.make_splash_mha(
      splash_lib.MultiHeadMask([head_mask] * N),
      block_sizes=splash_lib.BlockSizes(
        block_q=b,
        block_kv=b,
        block_kv_compute=b,
        block_q_dkv=b,
        block_kv_dkv=b,
        block_kv_dkv_compute=b,
        block_q_dq=b,
        block_kv_dq=b,
      ),
      head_shards=1,
      q_seq_shards=1,
      residual_checkpoint_name='attention_lse',
      interpret=interpret,
    )
    segments = splash_lib.SegmentIds(q=segment_ids_BT, kv=segment_ids_BT)
    return jax.vmap(kernel)(q_BNTH, k_BKSH, v_BKSH, segment_ids=segments)

  heads = ('act_batch', 'act_heads', None, None)
  kv_heads = ('act_batch', 'act_kv_heads', None, None)
  run = sharding.per_shard(local, (heads, kv_heads, kv_heads, ('act_batch', None)), heads)
  out_BNTH = run(q_BNTH, k_BKSH, v_BKSH, segment_ids_BT.astype(jnp.int32))
  return out_BNTH.transpose(0, 2, 1, 3).reshape(B, T + pad, K, G, H)[:, :T]
