"""Splash attention with the length split (context parallelism) equals the reference.

`splash.context_attention` runs per device on its two load-balanced query
chunks over the whole gathered row. Here each shard's call runs in a Python
loop on this CPU (the kernel interpreted, no shard_map): the rows are put in
`sharding.balance_order`, every shard attends from its queries, and the
outputs, put back in natural order, and the gradients, summed over the shards'
vjps, must equal `attention.reference` under `attention.make_mask` in natural
order. Documents cross the chunk boundaries and rows end in padding, so a
wrong chunk order, causal offset or segment order shows. Chunks are one
128-position tile, the kernel's least.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm import sharding
from llm.model import attention, block, splash
from tests.attention_kernels_test import TOLERANCE, _rows

os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')  # As in compile_test.py.

K, G, C = 2, 2, splash.LANES  # kv heads, queries per kv head, positions per chunk.


def _case(shards: int, B: int, H: int, dtype: str):
  """q [B, T, K, G, H], k, v, a cotangent, positions and segment ids, in natural order."""
  T = 2 * C * shards
  kq, kk, kv, kc = jax.random.split(jax.random.key(shards), 4)
  normal = lambda key, shape: jax.random.normal(key, shape).astype(dtype)
  arrays = (
    normal(kq, (B, T, K, G, H)),
    normal(kk, (B, T, K, H)),
    normal(kv, (B, T, K, H)),
    normal(kc, (B, T, K, G, H)),
  )
  # Row 0: three documents across chunk boundaries, then padding; row 1: one, then padding.
  documents = [[C + 37, T // 2 - 90, T // 4 - 3], [T - C // 2]][:B]
  return (*arrays, *_rows(T, documents))


def _zero_padding(out_BTKGH, segment_ids_BT):
  """What the caller does (`kernels.attention_kernel`): padding queries give zero."""
  return jnp.where(segment_ids_BT[:, :, None, None, None] != 0, out_BTKGH, 0).astype(
    out_BTKGH.dtype
  )


def _reference(q, k, v, cotangent, positions, segments, causal):
  """Forward values and (dq, dk, dv) of the reference, in natural order."""
  mask = attention.make_mask(positions, positions, segments, segments, causal=causal)
  fn = lambda q, k, v: _zero_padding(attention.reference(q, k, v, mask), segments)
  out, vjp = jax.vjp(fn, q, k, v)
  return out, vjp(cotangent)


def _context(q, k, v, cotangent, segments, shards, causal):
  """Forward values and (dq, dk, dv) of one `context_attention` call per shard, natural order."""
  order_T = sharding.balance_order(q.shape[1], shards)
  natural_T = np.argsort(order_T)
  q, k, v, cotangent, segments = (x[:, order_T] for x in (q, k, v, cotangent, segments))
  kernel = functools.partial(splash.context_attention, shards=shards, causal=causal, interpret=True)

  @jax.jit
  def one_shard(q_i, cotangent_i, segments_i, shard):
    fn = lambda q_i, k, v: _zero_padding(kernel(q_i, k, v, segments_i, segments, shard), segments_i)
    out_i, vjp = jax.vjp(fn, q_i, k, v)
    return out_i, vjp(cotangent_i)

  outs, dqs, dk, dv = [], [], 0, 0
  for i in range(shards):
    mine = slice(2 * C * i, 2 * C * (i + 1))
    out_i, (dq_i, dk_i, dv_i) = one_shard(
      q[:, mine], cotangent[:, mine], segments[:, mine], jnp.int32(i)
    )
    outs.append(out_i)
    dqs.append(dq_i)
    dk, dv = dk + dk_i.astype(jnp.float32), dv + dv_i.astype(jnp.float32)
  out, dq = jnp.concatenate(outs, axis=1), jnp.concatenate(dqs, axis=1)
  return out[:, natural_T], tuple(x[:, natural_T] for x in (dq, dk, dv))


CASES = [
  # shards, B, H, dtype, causal
  (2, 2, 64, 'float32', True),
  (4, 1, 128, 'float32', True),
  (2, 1, 64, 'bfloat16', True),
  (2, 2, 64, 'float32', False),
]


@pytest.mark.parametrize(
  'shards, B, H, dtype, causal',
  CASES,
  ids=[f'S{s}-B{b}-H{h}-{d}-{"causal" if c else "bidirectional"}' for s, b, h, d, c in CASES],
)
def test_context_attention_equals_the_reference(shards, B, H, dtype, causal):
  q, k, v, cotangent, positions, segments = _case(shards, B, H, dtype)
  want, want_grads = _reference(q, k, v, cotangent, positions, segments, causal)
  got, got_grads = _context(q, k, v, cotangent, segments, shards, causal)
  real = np.asarray(segments) != 0
  names = ('out', 'dq', 'dk', 'dv')
  for name, got_x, want_x in zip(names, (got, *got_grads), (want, *want_grads), strict=True):
    got_x, want_x = np.asarray(got_x, np.float32), np.asarray(want_x, np.float32)
    assert got_x.shape == want_x.shape, name
    np.testing.assert_allclose(
      got_x[real],
      want_x[real],
      rtol=0,
      atol=TOLERANCE[dtype] * float(np.abs(want_x).max()),
      err_msg=name,
    )
  # Nothing reaches padding: no query there has a cotangent, no real query sees its keys.
  for name, got_x in zip(names[1:], got_grads, strict=True):
    np.testing.assert_array_equal(np.asarray(got_x, np.float32)[~real], 0, err_msg=name)


@pytest.mark.parametrize('remat', ['minimal', 'full'])
def test_remat_under_the_switch_saves_what_one_kernel_saves(remat, capsys):
  """What the branches save is merged across them: each chunk's output and log-sum-exp, O(T).

  ('minimal', like the one-device `splash.attention`, keeps the kernel's
  output and log-sum-exp; 'full' keeps nothing but the arguments.)
  """

  q, k, v, _, _, segments = _case(2, 1, 64, 'float32')
  kernel = functools.partial(splash.context_attention, shards=2, causal=True, interpret=True)
  fn = jax.checkpoint(
    lambda q, k, v: kernel(q, k, v, segments[:, : 2 * C], segments, jnp.int32(1)).sum(),
    policy=block.REMAT_POLICIES[remat],
  )
  jax.ad_checkpoint.print_saved_residuals(fn, q[:, : 2 * C], k, v)
  saved = [
    line.split()[0]
    for line in capsys.readouterr().out.splitlines()
    if not any(why in line for why in ('from the argument', 'from a constant'))
  ]
  N = K * G
  chunk = [f'f32[1,{N},{C},64]', f'f32[1,{N},{C}]']
  assert sorted(saved) == (sorted(chunk * 2) if remat == 'minimal' else [])


@pytest.mark.parametrize(
  'seq_len, shards, chunk',
  [(256, 2, '64'), (1000, 2, '250'), (1030, 4, '128.75')],
)
def test_chunks_off_the_tiles_are_one_clear_error(seq_len, shards, chunk):
  q = jnp.zeros((1, seq_len // shards, K, G, 64))
  kv = jnp.zeros((1, seq_len, K, 64))
  segments = jnp.ones((1, seq_len), jnp.int32)
  with pytest.raises(
    ValueError,
    match=rf'seq_len={seq_len} split over mesh.sequence={shards} gives chunks of {chunk} '
    r'positions; splash needs chunks that are multiples of 128',
  ):
    splash.context_attention(
      q, kv, kv, segments[:, : seq_len // shards], segments, jnp.int32(0),
      shards=shards, causal=True, interpret=True,
    )  # fmt: skip
