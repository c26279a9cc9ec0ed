"""The CPU kernels' custom gradients equal autodiff of the plain computation; only 'cpu' takes them.

`kernels._cpu_low_precision_matmul` and `kernels._cpu_attention` replace
automatic differentiation with hand-written backward passes that XLA:CPU runs
faster. A wrong one would not crash: the model would train worse. So each is
checked against `jax.vjp` of the computation it stands for, in float32 and
bfloat16, with masks and padding; the platform switch is checked to pick them
on 'cpu' and the reference elsewhere; and a whole model's gradient with the
CPU kernels is checked against the reference kernels' (platform='tpu').
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm import losses
from llm.model import ModelConfig, Transformer, attention, kernels

# Tolerances, as fractions of the expected array's largest element. float32:
# the custom and automatic gradients are the same sums in another order
# (measured differences ~1e-7). bfloat16 keeps 8 significant bits, so each
# rounding is off by up to 2**-8 ~ 0.4%: the custom gradients round the
# cotangent to bfloat16 before their matmuls and keep float32 results, autodiff
# rounds at other points, so elements differ by a rounding or two of the
# largest (measured: up to 0.5% of it for the matmul, 0.7% for attention). 2% is
# about five roundings; a wrong gradient (a term, transpose, scale or mask
# missing, or 5% off) is off by more.
TOLERANCE = {'float32': 1e-5, 'bfloat16': 2e-2}


def assert_close(actual, expected, tol):
  """Same dtype and shape; every |actual - expected| within `tol` times the largest |expected|."""
  assert actual.dtype == expected.dtype and actual.shape == expected.shape
  actual = np.asarray(actual, np.float32)
  expected = np.asarray(expected, np.float32)
  np.testing.assert_allclose(actual, expected, rtol=0, atol=tol * np.abs(expected).max())


def has_custom_vjp(fn, *args) -> bool:
  return 'custom_vjp_call' in str(jax.make_jaxpr(fn)(*args))


def normal(key, shape, dtype):
  return jax.random.normal(key, shape).astype(dtype)


# ----------------------------------------------------------------------------
# Matmul.

# Distinct sizes, so a gradient with its axes swapped cannot have the right shape.
SIZES = {'B': 2, 'T': 5, 'D': 16, 'N': 3, 'H': 4, 'V': 24, 'F': 12}


def _shape(dims):
  return tuple(SIZES[d] for d in dims)


@pytest.mark.parametrize(
  'spec',
  ['BTD,DNH->BTNH', 'BTNH,NHD->BTD', 'BTD,VD->BTV', 'BTD,DV->BTV', 'BTD,DF->BTF', 'BTF,FD->BTD'],
)
@pytest.mark.parametrize(
  'dtype, out_dtype, param_dtype',
  [
    ('float32', 'float32', 'float32'),
    ('bfloat16', 'bfloat16', 'float32'),
    ('bfloat16', 'float32', 'float32'),  # The logits.
    ('bfloat16', 'bfloat16', 'bfloat16'),  # model.param_dtype='bfloat16'.
  ],
)
def test_low_precision_matmul_gradient_equals_autodiff(spec, dtype, out_dtype, param_dtype):
  lhs, rhs = spec.split('->')[0].split(',')
  kx, kw, kc = jax.random.split(jax.random.key(0), 3)
  x = normal(kx, _shape(lhs), dtype)  # kernels.matmul casts x to the compute dtype.
  w = normal(kw, _shape(rhs), param_dtype)
  cotangent = normal(kc, _shape(spec.split('->')[1]), out_dtype)
  dtype, out_dtype = jnp.dtype(dtype), jnp.dtype(out_dtype)

  def plain(x, w):
    y = jnp.einsum(spec, x, w.astype(dtype), preferred_element_type=jnp.float32)
    return y.astype(out_dtype)

  def custom(x, w):
    return kernels._cpu_low_precision_matmul(spec, dtype, out_dtype, x, w)

  # The vjp with `cotangent` is the gradient of sum(f(x, w) * cotangent).
  want, want_vjp = jax.vjp(plain, x, w)
  got, got_vjp = jax.vjp(custom, x, w)
  np.testing.assert_array_equal(got, want)
  assert got.dtype == out_dtype
  for got_grad, want_grad in zip(got_vjp(cotangent), want_vjp(cotangent), strict=True):
    assert_close(got_grad, want_grad, TOLERANCE[dtype.name])


@pytest.mark.parametrize(
  'platform, dtype, custom',
  [('cpu', 'bfloat16', True), ('cpu', 'float32', False), ('auto', 'bfloat16', False)]
  + [('tpu', 'bfloat16', False), ('gpu', 'bfloat16', False)],
)
def test_matmul_takes_the_custom_gradient_on_cpu_in_16_bits_only(platform, dtype, custom):
  cfg = ModelConfig(
    vocab_size=8,
    num_layers=1,
    d_model=16,
    num_heads=1,
    num_kv_heads=1,
    d_ff=8,
    dtype=dtype,
    platform=platform,
  )
  x = normal(jax.random.key(0), _shape('BTD'), dtype)
  w = normal(jax.random.key(1), _shape('DF'), 'float32')
  fn = lambda x, w: kernels.matmul(cfg, 'BTD,DF->BTF', x, w)
  assert has_custom_vjp(fn, x, w) == custom
  want = jnp.einsum('BTD,DF->BTF', x, w.astype(dtype), preferred_element_type=jnp.float32)
  assert_close(fn(x, w), want.astype(dtype), TOLERANCE[dtype])


# ----------------------------------------------------------------------------
# Attention.

B, T, K, G, H = 2, 8, 2, 2, 8  # Grouped-query: N = K * G = 4 query heads, 2 kv heads.
# Row 0: two documents, then padding; row 1: one document, then padding.
SEGMENTS_BT = jnp.array([[1, 1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]])
POSITIONS_BT = jnp.array([[0, 1, 2, 0, 1, 2, 0, 0], [0, 1, 2, 3, 4, 0, 0, 0]])
PADDING_BT = np.asarray(SEGMENTS_BT == 0)


def _mask(kind):
  arange_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
  if kind == 'none':
    return attention.make_mask(arange_BT, arange_BT, causal=False)
  if kind == 'causal':
    return attention.make_mask(arange_BT, arange_BT)
  return attention.make_mask(POSITIONS_BT, POSITIONS_BT, SEGMENTS_BT, SEGMENTS_BT)


def _qkv_and_cotangent(dtype):
  kq, kk, kv, kc = jax.random.split(jax.random.key(0), 4)
  return (
    normal(kq, (B, T, K, G, H), dtype),
    normal(kk, (B, T, K, H), dtype),
    normal(kv, (B, T, K, H), dtype),
    normal(kc, (B, T, K, G, H), dtype),
  )


@pytest.mark.parametrize('mask', ['none', 'causal', 'packed_and_padded'])
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_cpu_attention_gradient_equals_autodiff_of_the_reference(dtype, mask):
  q, k, v, cotangent = _qkv_and_cotangent(dtype)
  mask_B1TS = _mask(mask)
  want, want_vjp = jax.vjp(lambda q, k, v: attention.reference(q, k, v, mask_B1TS), q, k, v)
  got, got_vjp = jax.vjp(lambda q, k, v: kernels._cpu_attention(q, k, v, mask_B1TS), q, k, v)
  np.testing.assert_array_equal(got, want)
  got_grads, want_grads = got_vjp(cotangent), want_vjp(cotangent)
  for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
    assert_close(got_grad, want_grad, TOLERANCE[dtype])
  if mask == 'packed_and_padded':
    # Padding queries attend to nothing and padding keys are attended by none:
    # their softmax rows and columns are constants, so q and k take no gradient there.
    d_q_BTKGH, d_k_BSKH, _ = got_grads
    np.testing.assert_array_equal(np.asarray(d_q_BTKGH)[PADDING_BT], 0)
    np.testing.assert_array_equal(np.asarray(d_k_BSKH)[PADDING_BT], 0)
    # The others do, but for a document's first token: it sees only itself.
    sees_more_BT = ~PADDING_BT & (np.asarray(POSITIONS_BT) > 0)
    assert np.abs(np.asarray(d_q_BTKGH, np.float32)[sees_more_BT]).max(axis=(1, 2, 3)).min() > 0


@pytest.mark.parametrize('platform, custom', [('cpu', True), ('auto', False), ('tpu', False)])
def test_attention_kernel_takes_the_custom_gradient_on_cpu_only(platform, custom):
  cfg = ModelConfig(
    vocab_size=8,
    num_layers=1,
    d_model=K * G * H,
    num_heads=K * G,
    num_kv_heads=K,
    d_ff=8,
    platform=platform,
    attention_impl='xla',
  )
  q_BTKGH, k, v, cotangent_BTKGH = _qkv_and_cotangent('float32')
  q_BTNH = q_BTKGH.reshape(B, T, K * G, H)
  cotangent_BTNH = cotangent_BTKGH.reshape(B, T, K * G, H)
  mask_B1TS = _mask('packed_and_padded')
  fn = lambda q, k, v: kernels.attention_kernel(cfg, q, k, v, POSITIONS_BT, SEGMENTS_BT)
  assert has_custom_vjp(fn, q_BTNH, k, v) == custom

  def reference(q_BTNH, k, v):
    out_BTKGH = attention.reference(q_BTNH.reshape(q_BTKGH.shape), k, v, mask_B1TS)
    # A padding query attends to nothing: every kernel gives it a zero output.
    return jnp.where(~PADDING_BT[:, :, None, None], out_BTKGH.reshape(q_BTNH.shape), 0)

  got, got_vjp = jax.vjp(fn, q_BTNH, k, v)
  want, want_vjp = jax.vjp(reference, q_BTNH, k, v)
  np.testing.assert_array_equal(got, want)
  for got_grad, want_grad in zip(got_vjp(cotangent_BTNH), want_vjp(cotangent_BTNH), strict=True):
    assert_close(got_grad, want_grad, TOLERANCE['float32'])


# ----------------------------------------------------------------------------
# A whole model.

MODEL = dict(vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, d_ff=64)
MODEL_T = 16
# The kernels' bfloat16 differences pass through two layers and the embedding
# (measured: up to 1% of a leaf's largest element), so a little more room.
MODEL_TOLERANCE = {'float32': 1e-5, 'bfloat16': 3e-2}


@pytest.fixture(scope='module')
def params_and_batch():
  # Row 0: documents of 6 and 7 tokens, then 3 of padding; row 1: 11 tokens, 5 of padding.
  segment_ids = jnp.array([[1] * 6 + [2] * 7 + [0] * 3, [1] * 11 + [0] * 5])
  positions = jnp.array([[*range(6), *range(7), 0, 0, 0], [*range(11), *[0] * 5]])
  tokens = jax.random.randint(jax.random.key(1), (2, MODEL_T), 0, MODEL['vocab_size'])
  batch = {
    'inputs': tokens,
    'targets': jax.random.randint(jax.random.key(2), (2, MODEL_T), 0, MODEL['vocab_size']),
    'segment_ids': segment_ids,
    'positions': positions,
    'loss_mask': (segment_ids != 0).astype(jnp.float32),
  }
  init = jax.jit(Transformer(ModelConfig(**MODEL)).init)
  return nn.unbox(init(jax.random.key(0), tokens)['params']), batch


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_model_gradient_with_cpu_kernels_equals_the_reference_kernels(dtype, params_and_batch):
  # In float32 the CPU platform changes attention only; in bfloat16 the matmuls too.
  params, batch = params_and_batch
  grads = {}
  for platform in ('cpu', 'tpu'):
    loss = functools.partial(
      losses.train_sums, cfg=ModelConfig(**MODEL, dtype=dtype, platform=platform)
    )
    assert has_custom_vjp(loss, params, batch) == (platform == 'cpu')
    grads[platform], (nll, tokens, _) = jax.jit(jax.grad(loss, has_aux=True))(params, batch)
    assert tokens == 6 + 7 + 11 and np.isfinite(nll)
  paths_and_got = jax.tree_util.tree_leaves_with_path(grads['cpu'])
  for (path, got), want in zip(paths_and_got, jax.tree.leaves(grads['tpu']), strict=True):
    assert np.abs(want).max() > 0, jax.tree_util.keystr(path)
    assert_close(got, want, MODEL_TOLERANCE[dtype])


def test_the_platform_is_resolved_from_the_mesh_and_impossible_choices_stop():
  from llm import sharding

  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  assert kernels.resolve(ModelConfig(), mesh).platform == 'cpu'
  assert kernels.resolve(ModelConfig(platform='cpu'), mesh).platform == 'cpu'
  with pytest.raises(ValueError, match=r"model.platform='tpu' does not match the mesh's devices"):
    kernels.resolve(ModelConfig(platform='tpu'), mesh)
  with pytest.raises(ValueError, match=r"model.attention_impl='cudnn' needs NVIDIA GPUs"):
    kernels.resolve(ModelConfig(attention_impl='cudnn'), mesh)
  with pytest.raises(ValueError, match=r"model.platform='metal' is not one of"):
    ModelConfig(platform='metal')
