"""Blockwise (flash) attention in plain JAX: memory O(T x block) on every backend.

Dims: B batch, T query positions, S key/value positions, K kv heads, G query
heads per kv head, H head dim; n counts blocks, q and k are the positions
inside a query and a key block.

Why: the reference (`attention.reference`) materialises float32 weights
[B, K, G, T, S], and autodiff keeps them for the backward pass, so memory grows
with T^2. Here queries and keys go in blocks of `block` positions: the forward
pass keeps a running maximum and sum per query (the online softmax) and saves
only the output and the log-sum-exp [B, K, G, T]; the backward pass
(`jax.custom_vjp`) recomputes each block's weights from them (FlashAttention-2).

The mask is computed per block from positions and segment ids, exactly as
`attention.make_mask` would, and a key block it leaves empty is skipped
(`lax.cond`): the blocks above the diagonal of a causal row and, in a packed
row, those across documents. No ordering of positions is assumed. A query
that attends to nothing (segment id 0, padding) gets a zero output and sends
no gradient.

Remat: the forward pass names its output and log-sum-exp 'attention_out' and
'attention_lse' (`jax.ad_checkpoint.checkpoint_name`); a policy saving those
names (block.REMAT_POLICIES 'dots_saveable' and 'minimal') spares the
backward pass a second run of the forward loop. Everything inside the loops is
recomputed whatever the policy.

Matmuls take their operands in the compute dtype and accumulate in float32
(bfloat16 x bfloat16 -> float32 is also what XLA:CPU runs fast, see
`kernels.matmul`); the softmax and its statistics are float32.
"""

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from llm import sharding

# As attention._MASK_VALUE: finite, so a row that sees nothing stays finite.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
F32 = jnp.float32

# Positions per block. One training step of bench/attention.py's model at T = 4k
# on a 2-core x86-64 CPU took 2.61 s with blocks of 128, 2.45 s with 256, 3.12 s
# with 512 and 4.31 s with 1024 (0.36, 0.36, 0.44 s at T = 1k): a smaller block
# wastes less of the causal diagonal (the blocks on it compute their upper half
# for nothing), and its float32 scores (B x N x 256 x 256 x 4 bytes, 1 MiB for
# 4 heads) stay in cache; below 256 the loop's per-block cost wins.
DEFAULT_BLOCK = 256


def attention(
  q_BTKGH: jax.Array,
  k_BSKH: jax.Array,
  v_BSKH: jax.Array,
  positions_BT: jax.Array,
  segment_ids_BT: jax.Array | None,
  *,
  causal: bool,
  block: int | None = None,
  kv_positions_BS: jax.Array | None = None,
  kv_segment_ids_BS: jax.Array | None = None,
) -> jax.Array:
  """Attention [B, T, K, G, H] equal to `attention.reference` with `make_mask`'s mask.

  Keys and values have the queries' positions and segment ids unless
  `kv_positions_BS` (and `kv_segment_ids_BS`, None: one document) are given
  (context parallelism: this device's queries over the gathered row). Lengths that `block` (default
  DEFAULT_BLOCK) does not divide are padded with padding positions (segment
  id 0), which attend to nothing and which no query sees.
  """
  B, T, K, G, H = q_BTKGH.shape
  if kv_positions_BS is None:
    kv_positions_BS, kv_segment_ids_BS = positions_BT, segment_ids_BT
  # No segment ids: one document.
  if segment_ids_BT is None:
    segment_ids_BT = jnp.ones((B, T), jnp.int32)
  if kv_segment_ids_BS is None:
    kv_segment_ids_BS = jnp.ones(kv_positions_BS.shape, jnp.int32)
  block = block or DEFAULT_BLOCK
  q_nBKGqH, pos_q_nBq, seg_q_nBq = _blocks(min(block, T), q_BTKGH, positions_BT, segment_ids_BT)
  kv = _blocks(min(block, k_BSKH.shape[1]), k_BSKH, kv_positions_BS, kv_segment_ids_BS, v_BSKH)
  k_nBKkH, pos_k_nBk, seg_k_nBk, v_nBKkH = kv
  # Per device, so that whether a block is skipped depends on this device's rows only.
  blocks_q = (None, 'act_batch', 'act_kv_heads', None, None, None)
  blocks_kv, blocks_row = blocks_q[:3] + (None, None), (None, 'act_batch', None)
  run = sharding.per_shard(
    functools.partial(_flash, causal),
    (blocks_q, blocks_kv, blocks_kv) + (blocks_row,) * 4,
    blocks_q,
  )
  out_nBKGqH = run(q_nBKGqH, k_nBKkH, v_nBKkH, pos_q_nBq, seg_q_nBq, pos_k_nBk, seg_k_nBk)
  n, q = out_nBKGqH.shape[0], out_nBKGqH.shape[4]
  return out_nBKGqH.transpose(1, 0, 4, 2, 3, 5).reshape(B, n * q, K, G, H)[:, :T]


def _blocks(block: int, x_BTKX, positions_BT, segment_ids_BT, y_BTKX=None):
  """Padded to whole blocks, blocks first, so that a loop step reads one contiguous block.

  Returns x [n, B, K, (G,) block, H], positions and segment ids [n, B, block]
  (and y like x).
  """
  B, T = positions_BT.shape
  n = -(-T // block)
  pad = [(0, 0), (0, n * block - T)]

  def split(x):
    x = jnp.pad(x, pad + [(0, 0)] * (x.ndim - 2)).reshape(B, n, block, *x.shape[2:])
    # [B, n, block, K, (G,) H] -> [n, B, K, (G,) block, H]
    return x.transpose(1, 0, *range(3, x.ndim - 1), 2, x.ndim - 1)

  def rows(x):
    return jnp.pad(x.astype(jnp.int32), pad).reshape(B, n, block).transpose(1, 0, 2)

  out = (split(x_BTKX), rows(positions_BT), rows(segment_ids_BT))
  return out if y_BTKX is None else (*out, split(y_BTKX))


def _block_mask(pos_q_Bq, seg_q_Bq, pos_k_Bk, seg_k_Bk, causal: bool):
  """[B, 1, 1, q, k]: which keys of a block each query of a block sees (`make_mask`)."""
  mask_Bqk = (seg_q_Bq[:, :, None] == seg_k_Bk[:, None, :]) & (seg_k_Bk[:, None, :] != 0)
  if causal:
    mask_Bqk &= pos_q_Bq[:, :, None] >= pos_k_Bk[:, None, :]
  return mask_Bqk[:, None, None]


def _scores(q_BKGqH, k_BKkH, mask_B11qk):
  """Scaled logits [B, K, G, q, k] in float32, masked entries at the mask value."""
  H = q_BKGqH.shape[-1]
  s = jnp.einsum('BKGqH,BKkH->BKGqk', q_BKGqH, k_BKkH, preferred_element_type=F32)
  return jnp.where(mask_B11qk, s * (H**-0.5), _MASK_VALUE)


def _forward(causal, q_nBKGqH, k_nBKkH, v_nBKkH, pos_nBq, seg_nBq, pos_nBk, seg_nBk):
  """(out [n, B, K, G, q, H] in the compute dtype, log-sum-exp [n, B, K, G, q] float32)."""

  def query_block(_, xs):
    q_BKGqH, pos_q_Bq, seg_q_Bq = xs
    stats_BKGq = jnp.full(q_BKGqH.shape[:-1], _MASK_VALUE, F32)
    init = (stats_BKGq, jnp.zeros_like(stats_BKGq), jnp.zeros(q_BKGqH.shape, F32))

    def key_block(j, carry):
      mask = _block_mask(pos_q_Bq, seg_q_Bq, pos_nBk[j], seg_nBk[j], causal)

      def update(carry):
        max_BKGq, sum_BKGq, acc_BKGqH = carry
        s_BKGqk = _scores(q_BKGqH, k_nBKkH[j], mask)
        new_max_BKGq = jnp.maximum(max_BKGq, s_BKGqk.max(-1))
        p_BKGqk = jnp.where(mask, jnp.exp(s_BKGqk - new_max_BKGq[..., None]), 0.0)
        rescale_BKGq = jnp.exp(max_BKGq - new_max_BKGq)
        pv_BKGqH = jnp.einsum(
          'BKGqk,BKkH->BKGqH', p_BKGqk.astype(v_nBKkH.dtype), v_nBKkH[j], preferred_element_type=F32
        )
        return (
          new_max_BKGq,
          sum_BKGq * rescale_BKGq + p_BKGqk.sum(-1),
          acc_BKGqH * rescale_BKGq[..., None] + pv_BKGqH,
        )

      return jax.lax.cond(mask.any(), update, lambda carry: carry, carry)

    max_BKGq, sum_BKGq, acc_BKGqH = jax.lax.fori_loop(0, k_nBKkH.shape[0], key_block, init)
    # A query that sees nothing has sum 0 and accumulator 0: output 0, lse the mask value.
    sum_BKGq = jnp.where(sum_BKGq > 0, sum_BKGq, 1.0)
    out_BKGqH = (acc_BKGqH / sum_BKGq[..., None]).astype(q_BKGqH.dtype)
    return None, (out_BKGqH, max_BKGq + jnp.log(sum_BKGq))

  _, (out, lse) = jax.lax.scan(query_block, None, (q_nBKGqH, pos_nBq, seg_nBq))
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(causal, q_nBKGqH, k_nBKkH, v_nBKkH, *rows):
  return _forward(causal, q_nBKGqH, k_nBKkH, v_nBKkH, *rows)[0]


def _flash_fwd(causal, q_nBKGqH, k_nBKkH, v_nBKkH, *rows):
  """rows: positions and segment ids [n, B, block] of the query blocks, then of the key blocks."""
  out, lse = _forward(causal, q_nBKGqH, k_nBKkH, v_nBKkH, *rows)
  out, lse = checkpoint_name(out, 'attention_out'), checkpoint_name(lse, 'attention_lse')
  return out, (q_nBKGqH, k_nBKkH, v_nBKkH, rows, out, lse)


def _flash_bwd(causal, residuals, d_out_nBKGqH):
  """FlashAttention-2's backward: per block, d_s = p * (d_p - rowsum(d_out * out)).

  One pass over the blocks: each query block's d_q is summed in the loop's
  carry, d_k and d_v in float32 buffers of the whole row.
  """
  q_nBKGqH, k_nBKkH, v_nBKkH, rows, out_nBKGqH, lse_nBKGq = residuals
  pos_nBq, seg_nBq, pos_nBk, seg_nBk = rows
  H = q_nBKGqH.shape[-1]
  d_out_nBKGqH = d_out_nBKGqH.astype(q_nBKGqH.dtype)
  rowsum_nBKGq = jnp.einsum(
    'nBKGqH,nBKGqH->nBKGq', d_out_nBKGqH.astype(F32), out_nBKGqH.astype(F32)
  )

  def query_block(d_kv, xs):
    q_BKGqH, d_out_BKGqH, lse_BKGq, rowsum_BKGq, pos_q_Bq, seg_q_Bq = xs

    def key_block(j, carry):
      mask = _block_mask(pos_q_Bq, seg_q_Bq, pos_nBk[j], seg_nBk[j], causal)

      def update(carry):
        d_q_BKGqH, d_k_nBKkH, d_v_nBKkH = carry
        s_BKGqk = _scores(q_BKGqH, k_nBKkH[j], mask)
        p_BKGqk = jnp.where(mask, jnp.exp(s_BKGqk - lse_BKGq[..., None]), 0.0)
        d_v_BKkH = jnp.einsum(
          'BKGqk,BKGqH->BKkH',
          p_BKGqk.astype(q_BKGqH.dtype),
          d_out_BKGqH,
          preferred_element_type=F32,
        )
        d_p_BKGqk = jnp.einsum(
          'BKGqH,BKkH->BKGqk', d_out_BKGqH, v_nBKkH[j], preferred_element_type=F32
        )
        d_s_BKGqk = (p_BKGqk * (d_p_BKGqk - rowsum_BKGq[..., None]) * H**-0.5).astype(q_BKGqH.dtype)
        d_q_BKGqH += jnp.einsum(
          'BKGqk,BKkH->BKGqH', d_s_BKGqk, k_nBKkH[j], preferred_element_type=F32
        )
        d_k_BKkH = jnp.einsum('BKGqk,BKGqH->BKkH', d_s_BKGqk, q_BKGqH, preferred_element_type=F32)
        return d_q_BKGqH, d_k_nBKkH.at[j].add(d_k_BKkH), d_v_nBKkH.at[j].add(d_v_BKkH)

      return jax.lax.cond(mask.any(), update, lambda carry: carry, carry)

    init = (jnp.zeros(q_BKGqH.shape, F32), *d_kv)
    d_q_BKGqH, *d_kv = jax.lax.fori_loop(0, k_nBKkH.shape[0], key_block, init)
    return tuple(d_kv), d_q_BKGqH.astype(q_BKGqH.dtype)

  zeros_nBKkH = jnp.zeros(k_nBKkH.shape, F32)
  (d_k_nBKkH, d_v_nBKkH), d_q_nBKGqH = jax.lax.scan(
    query_block,
    (zeros_nBKkH, zeros_nBKkH),
    (q_nBKGqH, d_out_nBKGqH, lse_nBKGq, rowsum_nBKGq, pos_nBq, seg_nBq),
  )
  return (
    d_q_nBKGqH,
    d_k_nBKkH.astype(k_nBKkH.dtype),
    d_v_nBKkH.astype(v_nBKkH.dtype),
    *(None,) * len(rows),
  )


_flash.defvjp(_flash_fwd, _flash_bwd)
