"""Transformer building blocks, shared by every model family.

Dims legend as in `llm/model/__init__.py`. Parameters are created in `param_dtype`
(float32) and cast to the compute `dtype` at use, so the optimizer always sees
full-precision weights. Every parameter and main activation carries logical axis
names; `llm/sharding/` maps them onto the mesh.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm.config import ModelConfig
from llm.model import kernels

Array = jax.Array


def _param(module: nn.Module, name: str, shape, axes, init, cfg: ModelConfig):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, cfg.param_dtype)


def constrain(x: Array, axes: tuple[str | None, ...]) -> Array:
  """Pins an activation's sharding by logical names; a no-op without a mesh."""
  return nn.with_logical_constraint(x, axes)


def matmul(cfg: ModelConfig, spec: str, x: Array, w: Array, out_dtype=None) -> Array:
  """`einsum(spec, x, w)` in the compute dtype with float32 accumulation (`kernels.matmul`)."""
  return kernels.matmul(cfg, spec, x, w, out_dtype)


# The residual stream, between attention and the MLP: under tensor parallelism
# its length is split over the tensor axis too (`llm/sharding/`).
BTD = ('act_batch', 'act_res_length', 'act_embed')


class Norm(nn.Module):
  """LayerNorm (GPT) or RMSNorm (Llama), always computed in float32."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD: Array) -> Array:
    cfg = self.cfg
    D = x_BTD.shape[-1]
    x = x_BTD.astype(jnp.float32)
    scale_D = _param(self, 'scale', (D,), ('norm',), nn.initializers.ones, cfg)
    if cfg.norm == 'rmsnorm':
      x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + cfg.norm_eps)
      return (x * scale_D).astype(cfg.dtype)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    x = (x - mean) * jax.lax.rsqrt(var + cfg.norm_eps)
    bias_D = _param(self, 'bias', (D,), ('norm',), nn.initializers.zeros, cfg)
    return (x * scale_D + bias_D).astype(cfg.dtype)


def rope_inv_freq(
  H: int,
  theta: float,
  scaling: str = 'none',
  factor: float = 1.0,
  low_freq_factor: float = 1.0,
  high_freq_factor: float = 4.0,
  original_max_seq_len: int = 8192,
) -> Array:
  """Inverse frequencies [H // 2], optionally scaled for long context.

  The scalings are Hugging Face's `rope_type`s of the same names, computed the
  same way (float32), so imported Llama 3.1+ checkpoints match: 'linear' divides
  every frequency by `factor`; 'llama3' divides those whose wavelength exceeds
  original_max_seq_len / low_freq_factor, keeps those shorter than
  original_max_seq_len / high_freq_factor, and blends linearly in between.
  """
  inv_freq_h = 1.0 / (theta ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H))
  if scaling == 'linear':
    return inv_freq_h / factor
  if scaling == 'llama3':
    wavelen_h = 2 * math.pi / inv_freq_h
    smooth_h = (original_max_seq_len / wavelen_h - low_freq_factor) / (
      high_freq_factor - low_freq_factor
    )
    smoothed_h = (1 - smooth_h) * inv_freq_h / factor + smooth_h * inv_freq_h
    inv_freq_h = jnp.where(
      wavelen_h > original_max_seq_len / low_freq_factor,
      inv_freq_h / factor,
      jnp.where(wavelen_h < original_max_seq_len / high_freq_factor, inv_freq_h, smoothed_h),
    )
  return inv_freq_h


def rope_scaling_args(cfg: ModelConfig) -> dict:
  """The `rope_inv_freq` scaling arguments of a config."""
  return dict(
    scaling=cfg.rope_scaling,
    factor=cfg.rope_scaling_factor,
    low_freq_factor=cfg.rope_low_freq_factor,
    high_freq_factor=cfg.rope_high_freq_factor,
    original_max_seq_len=cfg.rope_original_max_seq_len,
  )


def apply_rope(x_BTNH: Array, positions_BT: Array, theta: float, **scaling) -> Array:
  """Rotary embedding in the rotate-half layout (first/second half pairs).

  This is the layout of Hugging Face's Llama, so imported q/k kernels need no
  permutation. Angles are computed in float32: bfloat16 positions lose
  precision past a few hundred tokens. `scaling`: keyword arguments of
  `rope_inv_freq` (none: plain RoPE).
  """
  H = x_BTNH.shape[-1]
  inv_freq_h = rope_inv_freq(H, theta, **scaling)
  angles_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq_h
  sin_BT1h = jnp.sin(angles_BTh)[:, :, None, :]
  cos_BT1h = jnp.cos(angles_BTh)[:, :, None, :]
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos_BT1h - x2 * sin_BT1h, x2 * cos_BT1h + x1 * sin_BT1h], axis=-1)
  return out.astype(x_BTNH.dtype)


def _write_cache(cache_BSKH: Array, new_BTKH: Array, index: Array) -> Array:
  """Writes T new keys (or values) at slot `index`; the cache is sharded like activations."""
  cache_BSKH = jax.lax.dynamic_update_slice_in_dim(
    cache_BSKH, new_BTKH.astype(cache_BSKH.dtype), index, axis=1
  )
  return constrain(cache_BSKH, ('act_batch', 'act_length', 'act_kv_heads', None))


class Attention(nn.Module):
  """Multi-head attention with grouped-query heads (K kv heads, K divides N).

  Decoding passes `cache` ({'k': k_BSKH, 'v': v_BSKH}, this layer's slice of
  the model's KV cache) and `cache_step` ({'index', 'mask_B1TS'}, shared by all
  layers; see `Transformer`): the T new keys and values are written at slot
  `index` and the queries attend over the whole cache through `mask_B1TS`.
  It then returns (out_BTD, updated cache).
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(
    self,
    x_BTD: Array,
    positions_BT: Array,
    segment_ids_BT: Array | None,
    cache: dict | None = None,
    cache_step: dict | None = None,
  ):
    cfg = self.cfg
    D, N, K, H = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    init = nn.initializers.normal(cfg.init_std)
    out_init = nn.initializers.normal(cfg.init_std / (2 * cfg.num_layers) ** 0.5)
    w_q_DNH = _param(self, 'q', (D, N, H), ('embed', 'heads', 'head_dim'), init, cfg)
    w_k_DKH = _param(self, 'k', (D, K, H), ('embed', 'kv_heads', 'head_dim'), init, cfg)
    w_v_DKH = _param(self, 'v', (D, K, H), ('embed', 'kv_heads', 'head_dim'), init, cfg)
    w_o_NHD = _param(self, 'o', (N, H, D), ('heads', 'head_dim', 'embed'), out_init, cfg)
    dt = cfg.dtype
    q_BTNH = matmul(cfg, 'BTD,DNH->BTNH', x_BTD, w_q_DNH)
    k_BTKH = matmul(cfg, 'BTD,DKH->BTKH', x_BTD, w_k_DKH)
    v_BTKH = matmul(cfg, 'BTD,DKH->BTKH', x_BTD, w_v_DKH)
    if cfg.use_bias:
      zeros = nn.initializers.zeros
      q_BTNH += _param(self, 'q_bias', (N, H), ('heads', 'head_dim'), zeros, cfg).astype(dt)
      k_BTKH += _param(self, 'k_bias', (K, H), ('kv_heads', 'head_dim'), zeros, cfg).astype(dt)
      v_BTKH += _param(self, 'v_bias', (K, H), ('kv_heads', 'head_dim'), zeros, cfg).astype(dt)
    if cfg.qk_norm:
      # Each head normalised over its H dims, [H] scales (Qwen3): `Norm`'s last axis.
      q_BTNH = Norm(cfg, name='q_norm')(q_BTNH)
      k_BTKH = Norm(cfg, name='k_norm')(k_BTKH)
    if cfg.position == 'rope':
      rope = rope_scaling_args(cfg)
      q_BTNH = apply_rope(q_BTNH, positions_BT, cfg.rope_theta, **rope)
      k_BTKH = apply_rope(k_BTKH, positions_BT, cfg.rope_theta, **rope)
    q_BTNH = constrain(q_BTNH, ('act_batch', 'act_length', 'act_heads', None))
    k_BTKH = constrain(k_BTKH, ('act_batch', 'act_length', 'act_kv_heads', None))
    v_BTKH = constrain(v_BTKH, ('act_batch', 'act_length', 'act_kv_heads', None))

    if cache is None:
      out_BTNH = kernels.attention_kernel(cfg, q_BTNH, k_BTKH, v_BTKH, positions_BT, segment_ids_BT)
    else:
      k_BSKH = _write_cache(cache['k'], k_BTKH, cache_step['index'])
      v_BSKH = _write_cache(cache['v'], v_BTKH, cache_step['index'])
      out_BTNH = kernels.cache_attention_kernel(
        cfg, q_BTNH, k_BSKH.astype(dt), v_BSKH.astype(dt), cache_step['mask_B1TS']
      )
    out_BTD = matmul(cfg, 'BTNH,NHD->BTD', out_BTNH, w_o_NHD)
    if cfg.use_bias:
      out_BTD += _param(self, 'o_bias', (D,), ('norm',), nn.initializers.zeros, cfg).astype(dt)
    if cache is None:
      return constrain(out_BTD, BTD)
    return constrain(out_BTD, BTD), {'k': k_BSKH, 'v': v_BSKH}


def activation(cfg: ModelConfig, x: Array) -> Array:
  """The GELU of `cfg.mlp`: GPT-2's tanh approximation, or BERT's exact erf form."""
  return nn.gelu(x, approximate=cfg.mlp != 'gelu_exact')


class Dense(nn.Module):
  """x @ W + b over the last (model) dim: the heads' small projections (pooler, MLM transform)."""

  cfg: ModelConfig
  features: int

  @nn.compact
  def __call__(self, x_BTD: Array) -> Array:
    cfg = self.cfg
    D, init = x_BTD.shape[-1], nn.initializers.normal(cfg.init_std)
    w_DE = _param(self, 'kernel', (D, self.features), ('embed', None), init, cfg)
    b_E = _param(self, 'bias', (self.features,), ('norm',), nn.initializers.zeros, cfg)
    return matmul(cfg, 'BTD,DE->BTE', x_BTD, w_DE) + b_E.astype(cfg.dtype)


class Mlp(nn.Module):
  """GELU MLP (GPT) or SwiGLU (Llama); `features` is its width (0: model.d_ff)."""

  cfg: ModelConfig
  features: int = 0

  @nn.compact
  def __call__(self, x_BTD: Array) -> Array:
    cfg = self.cfg
    D, F, dt = cfg.d_model, self.features or cfg.d_ff, cfg.dtype
    init = nn.initializers.normal(cfg.init_std)
    out_init = nn.initializers.normal(cfg.init_std / (2 * cfg.num_layers) ** 0.5)
    w_in_DF = _param(self, 'wi', (D, F), ('embed', 'mlp'), init, cfg)
    h_BTF = matmul(cfg, 'BTD,DF->BTF', x_BTD, w_in_DF)
    if cfg.use_bias:
      h_BTF += _param(self, 'wi_bias', (F,), ('mlp',), nn.initializers.zeros, cfg).astype(dt)
    if cfg.mlp == 'swiglu':
      w_gate_DF = _param(self, 'wg', (D, F), ('embed', 'mlp'), init, cfg)
      gate_BTF = matmul(cfg, 'BTD,DF->BTF', x_BTD, w_gate_DF)
      h_BTF = nn.silu(gate_BTF) * h_BTF
    else:
      h_BTF = activation(cfg, h_BTF)
    h_BTF = constrain(h_BTF, ('act_batch', 'act_length', 'act_mlp'))
    w_out_FD = _param(self, 'wo', (F, D), ('mlp', 'embed'), out_init, cfg)
    out_BTD = matmul(cfg, 'BTF,FD->BTD', h_BTF, w_out_FD)
    if cfg.use_bias:
      out_BTD += _param(self, 'wo_bias', (D,), ('norm',), nn.initializers.zeros, cfg).astype(dt)
    return constrain(out_BTD, BTD)
