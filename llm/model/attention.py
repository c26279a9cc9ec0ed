"""Dot-product attention: its masks and the reference computation every kernel must equal.

Dims: B batch, T query positions, S key/value positions, N query heads,
K kv heads, G = N // K query heads per kv head, H head dim.

Logits and softmax are computed in float32 whatever the compute dtype: bfloat16
softmax over long rows loses the small probabilities that matter for the loss.
The backend-specific implementations are in `llm/model/kernels.py`.
"""

import jax
import jax.numpy as jnp

# Large negative instead of -inf so fully masked rows (padding) give uniform
# weights rather than NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


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


def probs(q_BTKGH, k_BSKH, mask_B1TS):
  """Softmax weights [B, K, G, T, S] in float32."""
  H = q_BTKGH.shape[-1]
  logits_BKGTS = jnp.einsum(
    'BTKGH,BSKH->BKGTS', q_BTKGH, k_BSKH, preferred_element_type=jnp.float32
  )
  logits_BKGTS = logits_BKGTS * (H**-0.5)
  logits_BKGTS = jnp.where(mask_B1TS[:, :, None], logits_BKGTS, _MASK_VALUE)
  return jax.nn.softmax(logits_BKGTS, axis=-1)


def weighted_values(probs_BKGTS, v_BSKH):
  """The attention output [B, T, K, G, H] in the dtype of `v`."""
  # A float32 result keeps a bfloat16 matmul bfloat16 on XLA:CPU (see kernels.matmul).
  out_BTKGH = jnp.einsum(
    'BKGTS,BSKH->BTKGH',
    probs_BKGTS.astype(v_BSKH.dtype),
    v_BSKH,
    preferred_element_type=jnp.float32,
  )
  return out_BTKGH.astype(v_BSKH.dtype)


def reference(q_BTKGH, k_BSKH, v_BSKH, mask_B1TS):
  """Grouped-query attention, queries grouped per kv head: [B, T, K, G, H]."""
  return weighted_values(probs(q_BTKGH, k_BSKH, mask_B1TS), v_BSKH)
