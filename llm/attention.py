"""Dot-product attention, its masks, and the kernel switch.

Dims: B batch, T query positions, S key/value positions, N query heads,
K kv heads, G = N // K query heads per kv head, H head dim.

Logits and softmax are computed in float32 whatever the compute dtype: bfloat16
softmax over long rows loses the small probabilities that matter for the loss.
"""

import jax
import jax.numpy as jnp

# Large negative instead of -inf so fully masked rows (padding) give uniform
# weights rather than NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

IMPLEMENTATIONS = ('xla', 'cudnn')


def make_mask(
  q_positions_BT: jax.Array,
  kv_positions_BS: jax.Array,
  q_segment_ids_BT: jax.Array | None = None,
  kv_segment_ids_BS: jax.Array | None = None,
  *,
  causal: bool = True,
) -> jax.Array:
  """Boolean mask [B, 1, T, S], True where a query may attend to a key.

  Causality is decided by positions rather than array indices, so the same
  mask serves packed rows (positions restart per document) together with
  segment ids, and decoding with a KV cache (queries sit after the cache).
  Segment id 0 marks padding, which attends to nothing and is attended by none.
  """
  mask_BTS = jnp.ones(
    (q_positions_BT.shape[0], q_positions_BT.shape[1], kv_positions_BS.shape[1]), bool
  )
  if causal:
    mask_BTS &= q_positions_BT[:, :, None] >= kv_positions_BS[:, None, :]
  if q_segment_ids_BT is not None:
    mask_BTS &= q_segment_ids_BT[:, :, None] == kv_segment_ids_BS[:, None, :]
    mask_BTS &= kv_segment_ids_BS[:, None, :] != 0
  return mask_BTS[:, None]


def dot_product_attention(
  q_BTNH: jax.Array,
  k_BSKH: jax.Array,
  v_BSKH: jax.Array,
  mask_B1TS: jax.Array,
  *,
  implementation: str = 'xla',
) -> jax.Array:
  """Grouped-query attention; returns [B, T, N, H] in the dtype of `q`.

  `implementation='xla'` is plain einsums that run everywhere and that XLA fuses
  well on CPU and TPU, with a hand-written gradient (`_xla_attention_bwd`);
  'cudnn' calls jax.nn.dot_product_attention's fused kernel on NVIDIA GPUs.
  """
  if implementation == 'cudnn':
    return jax.nn.dot_product_attention(
      q_BTNH, k_BSKH, v_BSKH, mask=mask_B1TS, implementation='cudnn'
    )
  if implementation != 'xla':
    raise ValueError(
      f'Unknown attention implementation {implementation!r}; valid: {", ".join(IMPLEMENTATIONS)}.'
    )
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
  return _xla_attention(q_BTKGH, k_BSKH, v_BSKH, mask_B1TS).reshape(B, T, N, H)


def _probs(q_BTKGH, k_BSKH, mask_B1TS):
  """Softmax weights [B, K, G, T, S] in float32."""
  H = q_BTKGH.shape[-1]
  logits_BKGTS = jnp.einsum(
    'BTKGH,BSKH->BKGTS', q_BTKGH, k_BSKH, preferred_element_type=jnp.float32
  )
  logits_BKGTS = logits_BKGTS * (H**-0.5)
  logits_BKGTS = jnp.where(mask_B1TS[:, :, None], logits_BKGTS, _MASK_VALUE)
  return jax.nn.softmax(logits_BKGTS, axis=-1)


@jax.custom_vjp
def _xla_attention(q_BTKGH, k_BSKH, v_BSKH, mask_B1TS):
  return _xla_attention_fwd(q_BTKGH, k_BSKH, v_BSKH, mask_B1TS)[0]


def _xla_attention_fwd(q_BTKGH, k_BSKH, v_BSKH, mask_B1TS):
  probs_BKGTS = _probs(q_BTKGH, k_BSKH, mask_B1TS)
  # A float32 result keeps a bfloat16 matmul bfloat16 on XLA:CPU (see layers.matmul).
  out_BTKGH = jnp.einsum(
    'BKGTS,BSKH->BTKGH',
    probs_BKGTS.astype(v_BSKH.dtype),
    v_BSKH,
    preferred_element_type=jnp.float32,
  ).astype(v_BSKH.dtype)
  return out_BTKGH, (q_BTKGH, k_BSKH, v_BSKH, mask_B1TS, probs_BKGTS, out_BTKGH)


def _xla_attention_bwd(residuals, d_out_BTKGH):
  """The softmax gradient as flash attention computes it.

  d_logits = P * (dP - rowsum(dP * P)), and rowsum(dP * P) equals
  rowsum(dO * O) over the head dim: a [B, T, N, H] product instead of a
  [B, N, T, S] one. Automatic differentiation of the forward pass also
  re-reads the mask and fuses that row sum into the dP matmul, which XLA:CPU
  runs several times slower than the matmul alone (bench/RESULTS.md).
  """
  q_BTKGH, k_BSKH, v_BSKH, mask_B1TS, probs_BKGTS, out_BTKGH = residuals
  H = q_BTKGH.shape[-1]
  f32 = jnp.float32
  d_v_BSKH = jnp.einsum(
    'BKGTS,BTKGH->BSKH',
    probs_BKGTS.astype(v_BSKH.dtype),
    d_out_BTKGH,
    preferred_element_type=f32,
  )
  d_probs_BKGTS = jnp.einsum('BTKGH,BSKH->BKGTS', d_out_BTKGH, v_BSKH, preferred_element_type=f32)
  rowsum_BKGT = jnp.einsum('BTKGH,BTKGH->BKGT', d_out_BTKGH.astype(f32), out_BTKGH.astype(f32))
  d_logits_BKGTS = probs_BKGTS * (d_probs_BKGTS - rowsum_BKGT[..., None]) * (H**-0.5)
  # Fully masked rows (padding) have uniform weights but take no gradient.
  d_logits_BKGTS = jnp.where(mask_B1TS[:, :, None], d_logits_BKGTS, 0.0).astype(q_BTKGH.dtype)
  d_q_BTKGH = jnp.einsum('BKGTS,BSKH->BTKGH', d_logits_BKGTS, k_BSKH, preferred_element_type=f32)
  d_k_BSKH = jnp.einsum('BKGTS,BTKGH->BSKH', d_logits_BKGTS, q_BTKGH, preferred_element_type=f32)
  return (
    d_q_BTKGH.astype(q_BTKGH.dtype),
    d_k_BSKH.astype(k_BSKH.dtype),
    d_v_BSKH.astype(v_BSKH.dtype),
    None,
  )


_xla_attention.defvjp(_xla_attention_fwd, _xla_attention_bwd)
