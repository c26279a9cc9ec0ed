"""Backend-specific kernels, and the one place that chooses them: the mesh's device platform.

Why one place, and why the mesh: `python -m llm.compile --topology=v5e:4x4`
traces a TPU program on a CPU host, so a choice made from
`jax.default_backend()` at trace time would compile the CPU variants into the
TPU program whose memory it reports. Instead `ModelConfig.platform` names the
platform; `resolve` fills it from the mesh when a trainer or an inference
loader is built, and every kernel below reads only the config. Unresolved
('auto') means the portable reference path: plain einsums and automatic
differentiation, right on every backend.

What differs by platform:

  matmul     On CPU a 16-bit matmul takes a custom gradient. XLA:CPU runs a
             bfloat16 matmul at bfloat16 speed only when its result is float32,
             and computes one with a bfloat16 result, or a float32 operand, by
             upcasting both operands (several times slower; bench/RESULTS.md).
             Autodiff hands the backward matmuls the float32 cotangent of the
             accumulator; the custom gradient casts it to the compute dtype and
             keeps all three matmuls bfloat16 x bfloat16 -> float32. TPUs and GPUs
             accumulate in float32 anyway and take the plain einsum, which remat
             policies see as the dot they save.
  attention  `model.attention_impl` picks the kernel, 'auto' by platform and
             sequence length (`attention_choice`): 'splash' (the Pallas TPU
             kernel, llm/model/splash.py) on TPUs, 'cudnn' (jax's fused kernel)
             on NVIDIA GPUs, on CPUs 'xla' for rows of one 256-position block
             and 'blockwise' (flash attention in plain JAX, llm/model/flash.py)
             from two blocks on, where it was faster as well as smaller
             (bench/RESULTS.md). The fused kernels keep O(T) per head for the
             backward pass instead of the [B, N, T, S] float32 weights. 'xla' is
             the reference; on CPU with the softmax gradient hand-written in the
             flash-attention form (`_cpu_attention_bwd`), elsewhere autodiff, so
             remat policies can save the score matmul. Decoding with a KV cache
             always runs 'xla' (`cache_attention_kernel`). A choice the platform
             cannot run is an error, never a fallback.

Each custom gradient is checked against autodiff of the reference in
tests/kernels_test.py.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from llm import sharding
from llm.config import ModelConfig
from llm.model import attention, flash, splash

# Device platforms as jax names them, folded onto ModelConfig.platform's values.
_PLATFORMS = {'cpu': 'cpu', 'tpu': 'tpu', 'gpu': 'gpu', 'cuda': 'gpu', 'rocm': 'gpu'}


def platform_of(mesh: jax.sharding.Mesh) -> str:
  """'cpu', 'gpu' or 'tpu': what the mesh's devices are, not what this host is."""
  name = mesh.devices.flat[0].platform
  if name not in _PLATFORMS:
    raise ValueError(f'Devices of platform {name!r} are not supported (cpu, gpu, tpu).')
  return _PLATFORMS[name]


def resolve(cfg: ModelConfig, mesh: jax.sharding.Mesh) -> ModelConfig:
  """`cfg` with `platform` set from the mesh; stops on a choice the mesh cannot run."""
  platform = platform_of(mesh)
  if cfg.platform not in ('auto', platform):
    raise ValueError(
      f"model.platform={cfg.platform!r} does not match the mesh's devices ({platform}); "
      f"set model.platform='auto' or {platform!r}."
    )
  _check_runnable(cfg.attention_impl, platform, "the mesh's devices are")
  return dataclasses.replace(cfg, platform=platform)


# ----------------------------------------------------------------------------
# Matmul.


def matmul(cfg: ModelConfig, spec: str, x, w, out_dtype=None):
  """`einsum(spec, x, w)` in the compute dtype, accumulating in float32; `w` is a parameter.

  The result is `out_dtype` (default: the compute dtype).
  """
  dtype = jnp.dtype(cfg.dtype)
  out_dtype = jnp.dtype(out_dtype or dtype)
  if cfg.platform == 'cpu' and dtype != jnp.float32:
    return _cpu_low_precision_matmul(spec, dtype, out_dtype, x.astype(dtype), w)
  if out_dtype == dtype:
    return jnp.einsum(spec, x, w.astype(dtype))
  return jnp.einsum(spec, x, w.astype(dtype), preferred_element_type=out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _cpu_low_precision_matmul(spec, dtype, out_dtype, x, w):
  y = jnp.einsum(spec, x, w.astype(dtype), preferred_element_type=jnp.float32)
  return y.astype(out_dtype)


def _cpu_low_precision_matmul_fwd(spec, dtype, out_dtype, x, w):
  return _cpu_low_precision_matmul(spec, dtype, out_dtype, x, w), (x, w)


@jax.named_scope('cpu_kernel')
def _cpu_low_precision_matmul_bwd(spec, dtype, out_dtype, residuals, d_y):
  x, w = residuals
  inputs, out = spec.split('->')
  lhs, rhs = inputs.split(',')
  d_y = d_y.astype(dtype)
  d_x = jnp.einsum(f'{out},{rhs}->{lhs}', d_y, w.astype(dtype), preferred_element_type=jnp.float32)
  # d_w with its contracted dims first (for 'BTD,VD->BTV': DV, not VD) is
  # x^T @ d_y; in the other order XLA folds the transpose into the matmul and
  # picks operand layouts that have no bfloat16 kernel on CPU. The barrier
  # keeps it from folding the transpose back.
  contracted = ''.join(c for c in rhs if c in lhs) + ''.join(c for c in rhs if c not in lhs)
  d_w = jnp.einsum(f'{lhs},{out}->{contracted}', x, d_y, preferred_element_type=jnp.float32)
  d_w = jnp.einsum(f'{contracted}->{rhs}', jax.lax.optimization_barrier(d_w))
  return d_x.astype(x.dtype), d_w.astype(w.dtype)


_cpu_low_precision_matmul.defvjp(_cpu_low_precision_matmul_fwd, _cpu_low_precision_matmul_bwd)


# ----------------------------------------------------------------------------
# Attention.

# 'auto' on a CPU: the xla kernel below this many positions, blockwise from it
# on. One training step of bench/attention.py's 2-layer d_model 256 model on a
# 2-core x86-64 CPU (bench/RESULTS.md): up to 256 positions, one block of
# flash.DEFAULT_BLOCK, both do the same work and blockwise took 0.91-1.18x the
# xla kernel's time; from 512 (two blocks, one skipped by the causal mask) it
# took 0.73-0.83x, at 1k 0.69-0.74x and at 4k 0.30-0.47x, float32 and bfloat16.
CPU_BLOCKWISE_MIN_SEQ_LEN = 512


def attention_choice(cfg: ModelConfig, seq_len: int, shards: int = 1) -> str:
  """The kernel self-attention over `seq_len` positions runs: `cfg.attention_impl`, or for 'auto':

  tpu  'splash' when its 128-position tiles divide the row (split over `shards`
       sequence shards: each of their 2 x shards chunks), else 'xla', or with
       the length split 'blockwise';
  gpu  'cudnn' for 16-bit compute and a head dim cuDNN's flash kernel takes
       (a multiple of 8, at most 128), else 'blockwise';
  cpu  'xla' below CPU_BLOCKWISE_MIN_SEQ_LEN positions, 'blockwise' from there;
  unresolved platform: 'xla', the portable reference.
  """
  if cfg.attention_impl != 'auto':
    return cfg.attention_impl
  if cfg.platform == 'tpu':
    tile = splash.LANES * (2 * shards if shards > 1 else 1)
    return 'splash' if seq_len % tile == 0 else 'xla' if shards == 1 else 'blockwise'
  if cfg.platform == 'gpu':
    head_dim_fits = cfg.head_dim % 8 == 0 and cfg.head_dim <= 128
    return 'cudnn' if cfg.dtype != 'float32' and head_dim_fits else 'blockwise'
  if cfg.platform == 'cpu':
    return 'blockwise' if seq_len >= CPU_BLOCKWISE_MIN_SEQ_LEN else 'xla'
  return 'xla'


def _check_runnable(impl: str, platform: str, what: str) -> None:
  """Stops on a kernel the platform has no way to run: never a silent fallback."""
  needs = {'splash': ('tpu', 'TPUs'), 'cudnn': ('gpu', 'NVIDIA GPUs')}
  if impl in needs and platform != needs[impl][0]:
    raise ValueError(
      f'model.attention_impl={impl!r} needs {needs[impl][1]}, but {what} {platform!r}; '
      "set model.attention_impl='auto', 'blockwise' or 'xla'."
    )


def attention_kernel(cfg: ModelConfig, q_BTNH, k_BSKH, v_BSKH, positions_BT, segment_ids_BT):
  """Self-attention [B, T, N, H] of T positions over themselves (no KV cache).

  The mask is `attention.make_mask`'s, from positions and segment ids (None:
  one document); only the xla kernel materialises it. A padding query
  (segment id 0) attends to nothing: its output is zero whatever the kernel.
  'splash' and 'cudnn' apply causality by array index, which is causality by
  position when positions count up within each document, as packed rows and
  `Transformer`'s default positions do. With the length split over the
  sequence axis (context parallelism) each device attends from its own
  queries over the gathered row (`sharding.context_parallel`), which is in
  `sharding.balance_order`.
  """
  B, T = positions_BT.shape
  shards = sharding.sequence_shards()
  impl = attention_choice(cfg, T, shards)
  _check_runnable(impl, cfg.platform, 'model.platform is')
  if shards == 1:
    args = (q_BTNH, k_BSKH, v_BSKH, positions_BT, positions_BT, segment_ids_BT, segment_ids_BT)
    out_BTNH = _local_attention(cfg, impl, 1, *args, None)
  else:
    if segment_ids_BT is None:
      segment_ids_BT = jnp.ones((B, T), jnp.int32)
    kernel = functools.partial(_local_attention, cfg, impl, shards)
    out_BTNH = sharding.context_parallel(
      kernel, q_BTNH, k_BSKH, v_BSKH, positions_BT, segment_ids_BT
    )
  if segment_ids_BT is None or impl == 'blockwise':  # Blockwise gives padding 0 itself.
    return out_BTNH
  return jnp.where(segment_ids_BT[:, :, None, None] != 0, out_BTNH, 0).astype(out_BTNH.dtype)


def _local_attention(
  cfg, impl, shards, q_btnh, k_bskh, v_bskh, q_pos_bt, kv_pos_bs, q_seg_bt, kv_seg_bs, shard
):
  """Queries over keys, with this device's arrays when the length is split.

  With `shards` > 1 (inside `sharding.context_parallel`) the keys are the
  gathered row in `sharding.balance_order` and `shard` is this device's
  index. The xla and blockwise kernels mask by true positions, so the order
  of the row does not matter to them; splash's causality is by index, and it
  puts the row back in order itself; cuDNN then takes the mask.
  """
  b, t, n, h = q_btnh.shape
  k = k_bskh.shape[2]
  if impl == 'cudnn' and shards == 1:
    return _cudnn_attention(cfg, q_btnh, k_bskh, v_bskh, q_seg_bt)
  q_btkgh = q_btnh.reshape(b, t, k, n // k, h)
  if impl == 'blockwise':
    out_btkgh = flash.attention(
      q_btkgh,
      k_bskh,
      v_bskh,
      q_pos_bt,
      q_seg_bt,
      causal=cfg.causal,
      kv_positions_BS=kv_pos_bs,
      kv_segment_ids_BS=kv_seg_bs,
    )
  elif impl == 'splash' and shards == 1:
    out_btkgh = splash.attention(q_btkgh, k_bskh, v_bskh, q_seg_bt, causal=cfg.causal)
  elif impl == 'splash':
    out_btkgh = splash.context_attention(
      q_btkgh, k_bskh, v_bskh, q_seg_bt, kv_seg_bs, shard, shards=shards, causal=cfg.causal
    )
  else:
    mask_b1ts = attention.make_mask(q_pos_bt, kv_pos_bs, q_seg_bt, kv_seg_bs, causal=cfg.causal)
    if impl == 'cudnn':  # No empty rows: padding sees all, and the caller zeroes it.
      mask_b1ts |= (q_seg_bt == 0)[:, None, :, None]
      return jax.nn.dot_product_attention(
        q_btnh, k_bskh, v_bskh, mask=mask_b1ts, implementation='cudnn'
      )
    out_btkgh = _xla_attention(cfg, q_btkgh, k_bskh, v_bskh, mask_b1ts)
  return out_btkgh.reshape(b, t, n, h)


def cache_attention_kernel(cfg: ModelConfig, q_BTNH, k_BSKH, v_BSKH, mask_B1TS):
  """Attention through an explicit mask [B, 1, T, S] (decoding over a KV cache): always xla.

  T new queries attend to a cache of S slots, a shape the blockwise kernels
  gain nothing on, and whose mask already exists (`Transformer`'s cache step).
  """
  B, T, N, H = q_BTNH.shape
  q_BTKGH = q_BTNH.reshape(B, T, k_BSKH.shape[2], N // k_BSKH.shape[2], H)
  return _xla_attention(cfg, q_BTKGH, k_BSKH, v_BSKH, mask_B1TS).reshape(B, T, N, H)


def _xla_attention(cfg: ModelConfig, q_BTKGH, k_BSKH, v_BSKH, mask_B1TS):
  """The reference [B, T, K, G, H]; on CPU with its hand-written gradient."""
  if cfg.platform == 'cpu':
    return _cpu_attention(q_BTKGH, k_BSKH, v_BSKH, mask_B1TS)
  return attention.reference(q_BTKGH, k_BSKH, v_BSKH, mask_B1TS)


def _cudnn_attention(cfg: ModelConfig, q_BTNH, k_BSKH, v_BSKH, segment_ids_BT):
  """jax's cuDNN flash attention; causality by index, documents through a boolean mask.

  cuDNN's public entry takes no segment ids, so packed documents cost a
  [B, 1, T, S] boolean mask (T x S bytes per row, turned into a bias), not the
  reference's float32 weights per head. Padding attends to padding there, so
  that no row is empty; the caller zeroes it.
  """
  mask_B1TS = None
  if segment_ids_BT is not None:
    mask_B1TS = (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])[:, None]
  return jax.nn.dot_product_attention(
    q_BTNH, k_BSKH, v_BSKH, mask=mask_B1TS, is_causal=cfg.causal, implementation='cudnn'
  )


@jax.custom_vjp
def _cpu_attention(q_BTKGH, k_BSKH, v_BSKH, mask_B1TS):
  return attention.reference(q_BTKGH, k_BSKH, v_BSKH, mask_B1TS)


def _cpu_attention_fwd(q_BTKGH, k_BSKH, v_BSKH, mask_B1TS):
  probs_BKGTS = attention.probs(q_BTKGH, k_BSKH, mask_B1TS)
  out_BTKGH = attention.weighted_values(probs_BKGTS, v_BSKH)
  return out_BTKGH, (q_BTKGH, k_BSKH, v_BSKH, mask_B1TS, probs_BKGTS, out_BTKGH)


@jax.named_scope('cpu_kernel')
def _cpu_attention_bwd(residuals, d_out_BTKGH):
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


_cpu_attention.defvjp(_cpu_attention_fwd, _cpu_attention_bwd)
