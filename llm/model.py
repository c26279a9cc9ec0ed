"""The Transformer and its configuration.

Dims legend, used in tensor names (`x_BTD`) and einsum strings everywhere:

  B  batch                      T  query positions (sequence length)
  S  key/value positions        D  model width (d_model)
  F  MLP hidden width (d_ff)    N  query heads
  K  key/value heads            G  query heads per kv head (N // K)
  H  head dim                   V  vocabulary
  L  layers

One `Transformer` covers the decoder families by configuration, from shared
blocks: GPT-2/GPT-3 (learned positions, LayerNorm, GELU, biases, tied
embeddings) and Llama (RoPE, RMSNorm, SwiGLU, grouped-query attention, no
biases, untied output). Presets with published shapes are in
`experiments/presets.py`.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm import attention as attention_lib
from llm import layers

_CHOICES = {
  'norm': ('layernorm', 'rmsnorm'),
  'mlp': ('gelu', 'swiglu'),
  'position': ('learned', 'rope'),
  'remat': ('none', *layers.REMAT_POLICIES),
  'dtype': ('float32', 'bfloat16', 'float16'),
  'param_dtype': ('float32', 'bfloat16'),
  'attention_impl': attention_lib.IMPLEMENTATIONS,
  'rope_scaling': ('none', 'linear', 'llama3'),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything a layer may know about the model; layers never see the experiment config."""

  vocab_size: int = 256
  num_layers: int = 2
  d_model: int = 128
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 0  # 0: d_model // num_heads.
  d_ff: int = 512
  max_seq_len: int = 256
  norm: str = 'rmsnorm'
  norm_eps: float = 1e-5
  mlp: str = 'swiglu'
  position: str = 'rope'
  rope_theta: float = 10000.0
  # RoPE frequency scaling for long context, as Hugging Face's `rope_scaling`:
  # 'linear' divides every frequency by the factor; 'llama3' (Llama 3.1+)
  # divides only the low ones and blends the middle band; 'none' leaves them.
  rope_scaling: str = 'none'
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0  # 'llama3' only, like the next two.
  rope_high_freq_factor: float = 4.0
  rope_original_max_seq_len: int = 8192
  use_bias: bool = False
  tie_embeddings: bool = False
  causal: bool = True
  dtype: str = 'float32'  # Compute dtype; 'bfloat16' on accelerators.
  param_dtype: str = 'float32'
  scan_layers: bool = True
  remat: str = 'none'  # One of 'none', 'full', 'dots_saveable', 'minimal'; see layers.py.
  attention_impl: str = 'xla'
  init_std: float = 0.02

  def __post_init__(self):
    for field, valid in _CHOICES.items():
      if getattr(self, field) not in valid:
        raise ValueError(
          f'model.{field}={getattr(self, field)!r} is not one of {", ".join(valid)}.'
        )
    for field in ('vocab_size', 'num_layers', 'd_model', 'num_heads', 'num_kv_heads', 'd_ff'):
      if getattr(self, field) <= 0:
        raise ValueError(f'model.{field}={getattr(self, field)} must be positive.')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f'model.num_kv_heads={self.num_kv_heads} must divide '
        f'model.num_heads={self.num_heads} (grouped-query attention).'
      )
    if not self.head_dim:
      if self.d_model % self.num_heads:
        raise ValueError(
          f'model.d_model={self.d_model} is not divisible by model.num_heads={self.num_heads}; '
          'set model.head_dim explicitly.'
        )
      object.__setattr__(self, 'head_dim', self.d_model // self.num_heads)
    if self.position == 'rope' and self.head_dim % 2:
      raise ValueError(f'RoPE needs an even head_dim, got {self.head_dim}.')
    if self.rope_scaling != 'none' and self.rope_scaling_factor <= 0:
      raise ValueError(f'model.rope_scaling_factor={self.rope_scaling_factor} must be positive.')
    if self.rope_scaling == 'llama3' and self.rope_high_freq_factor <= self.rope_low_freq_factor:
      raise ValueError(
        f'model.rope_high_freq_factor={self.rope_high_freq_factor} must exceed '
        f'model.rope_low_freq_factor={self.rope_low_freq_factor}.'
      )

  @classmethod
  def from_dict(cls, d) -> 'ModelConfig':
    """Builds a config from a mapping, naming any key that is not a field."""
    d = dict(d)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(
        f'Unknown model config keys {unknown}; valid keys: {", ".join(sorted(fields))}.'
      )
    return cls(**d)


class Transformer(nn.Module):
  """tokens [B, T] int32 -> logits [B, T, V] float32."""

  cfg: ModelConfig

  @nn.compact
  def __call__(
    self,
    tokens_BT: jax.Array,
    positions_BT: jax.Array | None = None,
    segment_ids_BT: jax.Array | None = None,
  ) -> jax.Array:
    cfg = self.cfg
    B, T = tokens_BT.shape
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    embed_init = nn.initializers.normal(cfg.init_std)
    embed_VD = self.param(
      'embedding',
      nn.with_logical_partitioning(embed_init, ('vocab', 'embed')),
      (cfg.vocab_size, cfg.d_model),
      cfg.param_dtype,
    )
    x_BTD = jnp.take(embed_VD, tokens_BT, axis=0).astype(cfg.dtype)
    if cfg.position == 'learned':
      pos_PD = self.param(
        'pos_embedding',
        nn.with_logical_partitioning(nn.initializers.normal(0.01), (None, 'embed')),
        (cfg.max_seq_len, cfg.d_model),
        cfg.param_dtype,
      )
      x_BTD += jnp.take(pos_PD, positions_BT, axis=0).astype(cfg.dtype)
    x_BTD = layers.constrain(x_BTD, layers.BTD)

    block = layers.block_class(cfg)
    if cfg.scan_layers:
      stack = nn.scan(
        block,
        variable_axes={'params': 0},
        split_rngs={'params': True},
        in_axes=(nn.broadcast, nn.broadcast),
        length=cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: 'layers'},
      )
      x_BTD, _ = stack(cfg, name='layers')(x_BTD, positions_BT, segment_ids_BT)
    else:
      for i in range(cfg.num_layers):
        x_BTD, _ = block(cfg, name=f'layers_{i}')(x_BTD, positions_BT, segment_ids_BT)

    x_BTD = layers.Norm(cfg, name='final_norm')(x_BTD)
    if cfg.tie_embeddings:
      unembed_DV = embed_VD.T
    else:
      unembed_DV = self.param(
        'unembed',
        nn.with_logical_partitioning(embed_init, ('embed', 'vocab')),
        (cfg.d_model, cfg.vocab_size),
        cfg.param_dtype,
      )
    logits_BTV = jnp.einsum(
      'BTD,DV->BTV', x_BTD, unembed_DV.astype(cfg.dtype), preferred_element_type=jnp.float32
    )
    return layers.constrain(logits_BTV, ('act_batch', 'act_length', 'act_vocab'))


def abstract_params(cfg: ModelConfig, batch_size: int = 1, seq_len: int = 8):
  """Boxed parameter shapes (with logical axes) from `jax.eval_shape`: allocates nothing."""
  tokens = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
  return jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens)['params']


def count_params(cfg: ModelConfig) -> int:
  """Number of parameters, without allocating them."""
  leaves = jax.tree.leaves(nn.unbox(abstract_params(cfg)))
  return sum(int(x.size) for x in leaves)


def unstack_layers(params, num_layers: int):
  """Scanned layout {'layers': [L, ...]} -> unrolled {'layers_0': ..., 'layers_{L-1}': ...}."""
  params = dict(params)
  stacked = params.pop('layers')
  for i in range(num_layers):
    params[f'layers_{i}'] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return params


def stack_layers(params):
  """Unrolled layout -> scanned layout; the inverse of `unstack_layers`."""
  params = dict(params)
  names = sorted((k for k in params if k.startswith('layers_')), key=lambda k: int(k[7:]))
  per_layer = [params.pop(k) for k in names]
  params['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
  return params
