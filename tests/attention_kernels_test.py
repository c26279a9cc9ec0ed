"""The memory-efficient attention kernels equal the xla kernel; 'auto' picks by platform.

'blockwise' (llm/model/flash.py) and 'splash' (llm/model/splash.py, the Pallas
TPU kernel, run here with interpret=True) must compute what the reference
computes from `attention.make_mask`: forward values and the gradients of q, k
and v, with causal and bidirectional masks, packed documents, padding rows
and grouped-query heads (K = 2 kv heads, G = 2 queries each). Small blocks
make the blockwise kernel cross block boundaries at small T and skip blocks;
splash needs its 128-position tiles, so its rows are 256 long.
"""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm.model import ModelConfig, block, flash, kernels, splash

os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')  # As in compile_test.py.

# Tolerances, as fractions of the expected array's largest element. float32:
# the same sums in another order (measured below 1e-6). bfloat16: both sides
# round their matmul operands (the weights and the cotangent of each block) to
# 8 significant bits at different points, and splash also rounds q times
# 1/sqrt(H); measured up to 0.8% of the largest element. 2.5% is about six
# roundings; a missing term, scale or mask is off by far more.
TOLERANCE = {'float32': 1e-5, 'bfloat16': 2.5e-2}
K, G = 2, 2


def _rows(T: int, documents: list[list[int]]):
  """(positions, segment ids) [B, T]: each row's documents of the given lengths, then padding."""
  positions, segments = (
    np.zeros((len(documents), T), np.int32),
    np.zeros((len(documents), T), np.int32),
  )
  for b, lengths in enumerate(documents):
    start = 0
    for i, length in enumerate(lengths):
      positions[b, start : start + length] = np.arange(length)
      segments[b, start : start + length] = i + 1
      start += length
  return jnp.asarray(positions), jnp.asarray(segments)


def _case(T: int, H: int, mask: str, dtype: str):
  """q [B, T, N, H], k and v [B, T, K, H], a cotangent, positions, segment ids (or None)."""
  kq, kk, kv, kc = jax.random.split(jax.random.key(0), 4)
  normal = lambda key, shape: jax.random.normal(key, shape).astype(dtype)
  arrays = (
    normal(kq, (2, T, K * G, H)),
    normal(kk, (2, T, K, H)),
    normal(kv, (2, T, K, H)),
    normal(kc, (2, T, K * G, H)),
  )
  if mask == 'causal':  # One document per row, no padding.
    return (*arrays, jnp.broadcast_to(jnp.arange(T), (2, T)), None)
  # Row 0: three documents across block boundaries, then padding; row 1: one, then padding.
  third = T // 3
  return (*arrays, *_rows(T, [[third + 5, third - 9, third - 2], [T - T // 5]]))


def _cfg(impl: str, platform: str = 'auto', causal: bool = True, **fields) -> ModelConfig:
  fields = {'head_dim': 8, **fields}
  return ModelConfig(
    d_model=K * G * 8, num_heads=K * G, num_kv_heads=K, attention_impl=impl,
    platform=platform, causal=causal, **fields,
  )  # fmt: skip


def _assert_equal_to_xla(cfg: ModelConfig, T: int, mask: str):
  dtype = cfg.dtype
  q, k, v, cotangent, positions, segments = _case(T, cfg.head_dim, mask, dtype)
  # Autodiff of the reference, from the mask make_mask builds.
  xla = dataclasses.replace(cfg, attention_impl='xla', platform='auto')
  want, want_vjp = jax.vjp(
    lambda q, k, v: kernels.attention_kernel(xla, q, k, v, positions, segments), q, k, v
  )
  got, got_vjp = jax.vjp(
    lambda q, k, v: kernels.attention_kernel(cfg, q, k, v, positions, segments), q, k, v
  )
  for got_x, want_x in zip((got, *got_vjp(cotangent)), (want, *want_vjp(cotangent)), strict=True):
    assert got_x.dtype == want_x.dtype and got_x.shape == want_x.shape
    np.testing.assert_allclose(
      np.asarray(got_x, np.float32),
      np.asarray(want_x, np.float32),
      rtol=0,
      atol=TOLERANCE[dtype] * float(np.abs(np.asarray(want_x, np.float32)).max()),
    )
  if segments is not None:  # Padding attends to nothing: a zero output, whatever the kernel.
    np.testing.assert_array_equal(np.asarray(got, np.float32)[np.asarray(segments) == 0], 0)


MASKS = [('causal', True), ('packed', True), ('bidirectional_packed', False)]


@pytest.mark.parametrize('T, block', [(48, 16), (40, 16), (32, 64)], ids=['3x3', 'padded', '1x1'])
@pytest.mark.parametrize('mask, causal', MASKS, ids=[m for m, _ in MASKS])
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_blockwise_equals_xla(monkeypatch, T, block, mask, causal, dtype):
  monkeypatch.setattr(flash, 'DEFAULT_BLOCK', block)
  _assert_equal_to_xla(_cfg('blockwise', 'cpu', causal, dtype=dtype), T, mask)


SPLASH_CASES = [
  ('causal', True, 'float32'),
  ('packed', True, 'float32'),
  ('bidirectional_packed', False, 'float32'),
  ('packed', True, 'bfloat16'),
]


@pytest.mark.parametrize(
  'mask, causal, dtype', SPLASH_CASES, ids=['-'.join(map(str, c)) for c in SPLASH_CASES]
)
def test_splash_equals_xla(monkeypatch, mask, causal, dtype):
  # The TPU kernel itself, interpreted on this CPU: 256 positions in two 128-tiles.
  monkeypatch.setattr(splash, 'attention', functools.partial(splash.attention, interpret=True))
  cfg = _cfg('splash', 'tpu', causal, dtype=dtype, head_dim=128)
  _assert_equal_to_xla(cfg, 256, mask)


def test_splash_pads_a_length_off_its_tiles(monkeypatch):
  monkeypatch.setattr(splash, 'attention', functools.partial(splash.attention, interpret=True))
  _assert_equal_to_xla(_cfg('splash', 'tpu', head_dim=64), 136, 'packed')


def test_blockwise_skips_the_blocks_the_mask_leaves_empty(monkeypatch):
  """Blocks of 16: a causal row of 4 blocks computes 10 of 16; two documents of 2 blocks, 6."""
  q, k, v, _, _, _ = _case(64, 8, 'causal', 'float32')
  q = q[:1].reshape(1, 64, K, G, 8)
  computed = []
  scores = flash._scores

  def counted(*args):  # Runs inside the branch that computes a block, only when it is taken.
    jax.debug.callback(lambda: computed.append(1))
    return scores(*args)

  monkeypatch.setattr(flash, '_scores', counted)
  for documents, want in (([64], 10), ([32, 32], 6)):
    computed.clear()
    positions, segments = _rows(64, [documents])
    out = flash.attention(q, k[:1], v[:1], positions, segments, causal=True, block=16)
    jax.block_until_ready(out)
    jax.effects_barrier()
    assert len(computed) == want, documents


# ----------------------------------------------------------------------------
# Which kernel runs.


@pytest.mark.parametrize(
  'platform, fields, seq_len, want',
  [
    ('tpu', {}, 8192, 'splash'),
    ('tpu', {}, 256, 'splash'),
    ('tpu', {}, 100, 'xla'),  # Off the 128-position tiles.
    ('gpu', {'dtype': 'bfloat16'}, 4096, 'cudnn'),
    ('gpu', {'dtype': 'float32'}, 4096, 'blockwise'),  # cuDNN's flash kernel is 16-bit.
    ('gpu', {'dtype': 'bfloat16', 'head_dim': 256}, 4096, 'blockwise'),
    ('cpu', {}, kernels.CPU_BLOCKWISE_MIN_SEQ_LEN - 1, 'xla'),
    ('cpu', {}, kernels.CPU_BLOCKWISE_MIN_SEQ_LEN, 'blockwise'),
    ('cpu', {'dtype': 'bfloat16'}, 16384, 'blockwise'),
    ('auto', {}, 16384, 'xla'),  # Unresolved: the portable reference.
  ],
)
def test_auto_picks_the_kernel_from_the_platform_and_length(platform, fields, seq_len, want):
  assert kernels.attention_choice(_cfg('auto', platform, **fields), seq_len) == want


@pytest.mark.parametrize('impl', ['xla', 'blockwise', 'splash', 'cudnn'])
def test_an_explicit_choice_is_kept(impl):
  assert kernels.attention_choice(_cfg(impl, 'tpu'), 100) == impl


@pytest.mark.parametrize(
  'platform, T, marker',
  [
    ('cpu', 1024, 'name=_flash'),  # Blockwise: its custom_vjp.
    ('cpu', 256, 'name=_cpu_attention'),  # xla, with the CPU gradient.
    ('tpu', 256, 'pallas_call'),  # Splash.
  ],
)
def test_the_traced_program_holds_the_chosen_kernel(platform, T, marker):
  q, k, v, _, positions, segments = _case(T, 8, 'packed', 'float32')
  cfg = _cfg('auto', platform)
  fn = lambda q, k, v: kernels.attention_kernel(cfg, q, k, v, positions, segments)
  jaxpr = str(jax.make_jaxpr(fn)(q, k, v))
  others = {'name=_flash', 'name=_cpu_attention', 'pallas_call'} - {marker}
  assert marker in jaxpr and not any(other in jaxpr for other in others)


def test_a_kernel_the_platform_cannot_run_is_one_clear_error():
  from llm import sharding

  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  assert kernels.resolve(_cfg('blockwise'), mesh).platform == 'cpu'
  with pytest.raises(
    ValueError, match=r"attention_impl='splash' needs TPUs, but the mesh's devices are 'cpu'"
  ):
    kernels.resolve(_cfg('splash'), mesh)
  with pytest.raises(ValueError, match=r"attention_impl='cudnn' needs NVIDIA GPUs"):
    kernels.resolve(_cfg('cudnn'), mesh)
  q, k, v, _, positions, segments = _case(128, 8, 'packed', 'float32')
  with pytest.raises(
    ValueError, match=r"attention_impl='splash' needs TPUs, but model.platform is 'auto'"
  ):
    kernels.attention_kernel(_cfg('splash'), q, k, v, positions, segments)


# ----------------------------------------------------------------------------
# Remat and a whole train step.


@pytest.mark.parametrize(
  'remat, saved', [('full', False), ('dots_saveable', True), ('minimal', True)]
)
def test_remat_policies_save_the_blockwise_residuals_by_name(remat, saved, capsys):

  q, k, v, _, positions, segments = _case(32, 8, 'packed', 'float32')
  q = q.reshape(2, 32, K, G, 8)
  fn = jax.checkpoint(
    lambda q, k, v: flash.attention(q, k, v, positions, segments, causal=True, block=16).sum(),
    policy=block.REMAT_POLICIES[remat],
  )
  jax.ad_checkpoint.print_saved_residuals(fn, q, k, v)
  out = capsys.readouterr().out
  assert ("named 'attention_out'" in out) == saved
  assert ("named 'attention_lse'" in out) == saved


def test_blockwise_trains_like_xla_on_a_sharded_mesh():
  """Three train steps: rows split over data x fsdp and heads over tensor, against one device."""
  from tests.train_test import _losses, tiny_config

  blockwise = tiny_config(
    **{'model.attention_impl': 'blockwise', 'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2}
  )
  xla = tiny_config(**{'model.attention_impl': 'xla', 'mesh.data': 1})
  with pytest.MonkeyPatch.context() as m:
    m.setattr(flash, 'DEFAULT_BLOCK', 8)  # 4 blocks of the 32 positions.
    _, _, got = _losses(blockwise, jax.devices()[:8])
  _, _, want = _losses(xla, jax.devices()[:1])
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_a_tpu_train_step_compiles_with_splash():
  pytest.importorskip('libtpu', reason='TPU topologies need libtpu: requirements-tpu.txt')
  from llm import compile as compile_lib
  from tests.train_test import tiny_config

  # Rows over fsdp and heads over tensor: the kernel runs per device on its shard.
  mesh = {'mesh.data': 1, 'mesh.fsdp': 2, 'mesh.tensor': 2}
  c = tiny_config(**{'model.dtype': 'bfloat16', 'model.remat': 'full', **mesh}, seq_len=256)
  report = compile_lib.compile_train_step(c, compile_lib.topology_devices('v5e:2x2'))
  hlo = report.compiled.as_text()
  # The forward kernel (run again under full remat) and both backward kernels.
  for kernel in ('splash_mha_fwd', 'splash_mha_dq', 'splash_mha_dkv'):
    assert kernel in hlo, kernel
  assert report.temp_bytes > 0
