"""The Transformer: embeddings, the stack of blocks, the heads; its KV cache and layouts."""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm import sharding
from llm.config import ModelConfig
from llm.model import attention as attention_lib
from llm.model import block as block_lib
from llm.model import layers

# Logits [B, T, V] (or [B, 1, C]): split by batch, and by vocabulary over `tensor`.
LOGITS = ('act_batch', 'act_length', 'act_vocab')


class Transformer(nn.Module):
  """tokens [B, T] int32 -> logits [B, T, V] float32.

  Decoding: with `cache` (from `init_cache`) the T tokens are written into the
  cache at slot cache['index'] and attend to every filled slot at a position
  <= theirs, and the call returns (logits, updated cache). Positions default
  to index + arange(T), segment ids to 1; a token with segment id 0 (padding)
  is written into a slot that nothing attends to. `logits_index_B` keeps one
  position per row (the logits come back [B, 1, V]): a prefill needs only
  each prompt's last logits, not a [B, T, V] array.

  With head='classifier' the output is [B, 1, num_labels], from the position
  `logits_index_B` of each row: by default the first ([CLS]) for an encoder
  and the last for a decoder, which is only right for rows without padding.
  `token_types_BT` (0 or 1 per token) needs model.type_vocab_size > 0; None
  means all 0.

  `hidden=True` (lm and mlm heads, no cache) returns (x_BTD, `Head`) instead
  of logits: the states the vocabulary projection reads (after the final norm
  and the masked-LM transform) and its parameters, so that the loss can take
  `unembed` over chunks of positions and never hold [B, T, V] float32 logits.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(
    self,
    tokens_BT: jax.Array,
    positions_BT: jax.Array | None = None,
    segment_ids_BT: jax.Array | None = None,
    cache: dict | None = None,
    logits_index_B: jax.Array | None = None,
    token_types_BT: jax.Array | None = None,
    hidden: bool = False,
  ):
    cfg = self.cfg
    if hidden and (cache is not None or cfg.head == 'classifier'):
      raise ValueError('hidden=True is for the loss of an lm or mlm head, without a cache.')
    B, T = tokens_BT.shape
    if positions_BT is None:
      start = 0 if cache is None else cache['index']
      positions_BT = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
    embed_VD, x_BTD = self._embed(tokens_BT, positions_BT, token_types_BT)

    decode = None
    if cache is not None:
      segment_ids_BT, cache, cache_step = _cache_step(cache, positions_BT, segment_ids_BT, cfg)
      decode = ({'k': cache['k'], 'v': cache['v']}, cache_step)
    x_BTD, out = self._layers(x_BTD, positions_BT, segment_ids_BT, decode)
    if cache is None:
      self.sow('moe_stats', 'mean', block_lib.mean_stats(out, cfg))

    if logits_index_B is None and cfg.head == 'classifier':
      logits_index_B = jnp.full((B,), T - 1 if cfg.causal else 0, jnp.int32)
    if logits_index_B is not None:
      x_BTD = jnp.take_along_axis(x_BTD, logits_index_B[:, None, None], axis=1)
    if cfg.norm_position == 'pre':
      x_BTD = layers.Norm(cfg, name='final_norm')(x_BTD)
    if cfg.head == 'classifier':
      logits_BTV = layers.constrain(self._classify(x_BTD), LOGITS)
    else:
      x_BTD, head = self._unembed(x_BTD, embed_VD)
      if hidden:
        return x_BTD, head
      logits_BTV = unembed(cfg, x_BTD, head)
    if cache is None:
      return logits_BTV
    return logits_BTV, dict(cache, **out)

  def _layers(self, x_BTD, positions_BT, segment_ids_BT, decode):
    """The stack: (x_BTD, routing statistics summed over layers, or the updated KV cache).

    Decoding (`decode` = (this step's KV cache {'k', 'v'} [L, ...], the
    step's write index and mask)) adds two inputs per layer: its KV slice
    (scanned) and the step (the same for every layer).
    """
    cfg = self.cfg
    args = (x_BTD, positions_BT, segment_ids_BT)
    if not cfg.scan_layers:
      outs = []
      for i, sparse in enumerate(cfg.sparse_layers()):
        layer = block_lib.block_class(cfg)(cfg, sparse=sparse, name=f'layers_{i}')
        step = () if decode is None else (jax.tree.map(lambda c, i=i: c[i], decode[0]), decode[1])
        x_BTD, out = layer(*args, *step)
        outs.append(out)
        args = (x_BTD, *args[1:])
      join = (lambda *o: sum(o)) if decode is None else (lambda *o: jnp.stack(o))
      return x_BTD, jax.tree.map(join, *outs)
    outs, first = [], 0
    for group in block_lib.groups(cfg):
      unit, attrs = block_lib.unit_class(cfg, group)
      step, step_axes = _group_step(decode, first, group)
      stack = nn.scan(
        unit,
        variable_axes={'params': 0},
        split_rngs={'params': True},
        in_axes=(nn.broadcast, nn.broadcast, *step_axes),
        length=group.repeats,
        metadata_params={nn.PARTITION_NAME: 'layers'},
      )
      x_BTD, out = stack(cfg, **attrs, name=group.name)(*args, *step)
      outs.append(_group_out(out, group, decode is not None))
      args, first = (x_BTD, *args[1:]), first + group.repeats * len(group.sparse)
    join = (lambda *o: sum(o)) if decode is None else (lambda *o: jnp.concatenate(o))
    return x_BTD, jax.tree.map(join, *outs)

  def _embed(self, tokens_BT, positions_BT, token_types_BT):
    """Token (+ learned position, + token type) embeddings; returns (table, x_BTD)."""
    cfg = self.cfg
    embed_init = nn.initializers.normal(cfg.init_std)
    embed_VD = self.param(
      'embedding',
      nn.with_logical_partitioning(embed_init, ('vocab', 'embed')),
      (cfg.vocab_size, cfg.d_model),
      cfg.param_dtype,
    )
    x_BTD = sharding.embedding_lookup(embed_VD, tokens_BT).astype(cfg.dtype)
    if cfg.position == 'learned':
      pos_PD = self.param(
        'pos_embedding',
        nn.with_logical_partitioning(nn.initializers.normal(0.01), (None, 'embed')),
        (cfg.max_seq_len, cfg.d_model),
        cfg.param_dtype,
      )
      pos_PD = nn.with_logical_constraint(pos_PD, (None, None))  # As for the table above.
      x_BTD += jnp.take(pos_PD, positions_BT, axis=0).astype(cfg.dtype)
    if cfg.type_vocab_size:
      types_YD = self.param(
        'type_embedding',
        nn.with_logical_partitioning(embed_init, (None, 'embed')),
        (cfg.type_vocab_size, cfg.d_model),
        cfg.param_dtype,
      )
      types_YD = nn.with_logical_constraint(types_YD, (None, None))
      if token_types_BT is None:
        token_types_BT = jnp.zeros_like(tokens_BT)
      x_BTD += jnp.take(types_YD, token_types_BT, axis=0).astype(cfg.dtype)
    elif token_types_BT is not None:
      raise ValueError('token_types_BT were given but model.type_vocab_size is 0.')
    if cfg.norm_position == 'post':
      x_BTD = layers.Norm(cfg, name='embed_norm')(x_BTD)
    return embed_VD, layers.constrain(x_BTD, layers.BTD)

  def _unembed(self, x_BTD, embed_VD):
    """(x_BTD, `Head`) for `unembed`: the masked-LM head first applies BERT's transform.

    The transform is per position and small, so it stays here with its
    submodules; only the [D, V] projection is left to the caller.
    """
    cfg = self.cfg
    if cfg.head == 'mlm':
      x_BTD = layers.Dense(cfg, cfg.d_model, name='mlm_dense')(x_BTD)
      x_BTD = layers.activation(cfg, x_BTD)
      x_BTD = layers.Norm(cfg, name='mlm_norm')(x_BTD)
    w = embed_VD
    if not cfg.tie_embeddings:
      w = self.param(
        'unembed',
        nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ('embed', 'vocab')),
        (cfg.d_model, cfg.vocab_size),
        cfg.param_dtype,
      )
    bias_V = None
    if cfg.head == 'mlm':
      bias_V = self.param(
        'unembed_bias',
        nn.with_logical_partitioning(nn.initializers.zeros, ('vocab',)),
        (cfg.vocab_size,),
        cfg.param_dtype,
      )
    return x_BTD, Head(w, bias_V)

  def _classify(self, x_B1D):
    """Class logits [B, 1, C]; an encoder pools first (dense + tanh), as BERT."""
    cfg = self.cfg
    if not cfg.causal:
      x_B1D = jnp.tanh(layers.Dense(cfg, cfg.d_model, name='pooler')(x_B1D))
    logits = layers.Dense(cfg, cfg.num_labels, name='classifier')(x_B1D)
    return logits.astype(jnp.float32)


def _group_step(decode, first: int, group: block_lib.Group):
  """A group's decoding inputs and their scan axes: its layers' KV slices [repeats, (n,) ...]."""
  if decode is None:
    return (), ()
  n = len(group.sparse)
  kv = jax.tree.map(lambda c: c[first : first + group.repeats * n], decode[0])
  if n > 1:
    kv = jax.tree.map(lambda c: c.reshape(group.repeats, n, *c.shape[1:]), kv)
  return (kv, decode[1]), (0, nn.broadcast)


def _group_out(out, group: block_lib.Group, decoding: bool):
  """A group's scan outputs: routing statistics summed, or KV caches back to [layers, ...]."""
  if not decoding:
    return jax.tree.map(lambda o: jnp.sum(o, axis=0), out)
  unit_dims = 1 + (len(group.sparse) > 1)
  return jax.tree.map(lambda o: o.reshape(-1, *o.shape[unit_dims:]), out)


class Head(NamedTuple):
  """The vocabulary projection's parameters, as `Transformer(hidden=True)` returns them.

  w: the embedding table [V, D] when tied (as it is, not transposed: XLA:CPU
  copied a transposed table on every decoding step, bench/RESULTS.md), else
  the unembedding [D, V]. bias: the masked-LM head's [V] bias, else None.
  """

  w: jax.Array
  bias: jax.Array | None


def unembed(cfg: ModelConfig, x_BTD: jax.Array, head: Head) -> jax.Array:
  """Float32 logits of final hidden states, split over `tensor` by vocabulary.

  The one projection for both paths: the model's own output, and the loss's
  chunks of positions (`llm/losses.py`), which must give the same numbers.
  """
  spec = 'BTD,VD->BTV' if cfg.tie_embeddings else 'BTD,DV->BTV'
  logits_BTV = layers.matmul(cfg, spec, x_BTD, head.w, jnp.float32)
  if head.bias is not None:
    logits_BTV += head.bias
  return layers.constrain(logits_BTV, LOGITS)


# Logical axis names of the KV cache: sharded like the activations.
CACHE_AXES = {
  'k': (None, 'act_batch', 'act_length', 'act_kv_heads', None),
  'v': (None, 'act_batch', 'act_length', 'act_kv_heads', None),
  'positions': ('act_batch', 'act_length'),
  'segment_ids': ('act_batch', 'act_length'),
  'index': (),
}


def init_cache(cfg: ModelConfig, batch_size: int, length: int) -> dict:
  """An empty KV cache of `length` slots per row, for `Transformer.__call__(cache=)`.

  k, v: [L, B, S, K, H] in the compute dtype, stacked over layers whether or
  not they are scanned. positions, segment_ids: [B, S], per slot; segment id 0
  marks a slot that holds nothing (never written, or padding). index: the
  next slot to write, shared by all rows, so a step writes one contiguous
  column and rows of different lengths differ only in their positions.
  """
  kv_LBSKH = jnp.zeros(
    (cfg.num_layers, batch_size, length, cfg.num_kv_heads, cfg.head_dim), cfg.dtype
  )
  slots_BS = jnp.zeros((batch_size, length), jnp.int32)
  return {
    'k': kv_LBSKH,
    'v': kv_LBSKH,
    'positions': slots_BS,
    'segment_ids': slots_BS,
    'index': jnp.zeros((), jnp.int32),
  }


def _cache_step(cache: dict, positions_BT, segment_ids_BT, cfg: ModelConfig):
  """Records the T new tokens' positions and segments in the cache; builds their mask.

  Returns (segment ids of the queries, cache with positions, segment_ids and
  index advanced, {'index': where the layers write, 'mask_B1TS'}).
  """
  index = cache['index']
  if segment_ids_BT is None:
    segment_ids_BT = jnp.ones(positions_BT.shape, jnp.int32)
  positions_BS = jax.lax.dynamic_update_slice_in_dim(
    cache['positions'], positions_BT.astype(jnp.int32), index, axis=1
  )
  segment_ids_BS = jax.lax.dynamic_update_slice_in_dim(
    cache['segment_ids'], segment_ids_BT.astype(jnp.int32), index, axis=1
  )
  mask_B1TS = attention_lib.make_mask(
    positions_BT, positions_BS, segment_ids_BT, segment_ids_BS, causal=cfg.causal
  )
  T = positions_BT.shape[1]
  cache = dict(cache, positions=positions_BS, segment_ids=segment_ids_BS, index=index + T)
  return segment_ids_BT, cache, {'index': index, 'mask_B1TS': mask_B1TS}


def abstract_params(cfg: ModelConfig, batch_size: int = 1, seq_len: int = 8):
  """Boxed parameter shapes (with logical axes) from `jax.eval_shape`: allocates nothing."""
  tokens = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
  return jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens)['params']


def param_shardings(cfg: ModelConfig, mesh: jax.sharding.Mesh):
  """Every param's NamedSharding on `mesh`, from its logical axes: the one derivation of them."""
  return sharding.logical_shardings(abstract_params(cfg), mesh)


def count_params(cfg: ModelConfig) -> int:
  """Number of parameters, without allocating them."""
  leaves = jax.tree.leaves(nn.unbox(abstract_params(cfg)))
  return sum(int(x.size) for x in leaves)


def count_active_params(cfg: ModelConfig) -> int:
  """Parameters one token uses: `count_params` less the routed experts it is not sent to.

  A routed expert weight (`wi`, `wg` or `wo` of a `moe` module, with an `exp`
  axis) counts experts_per_token / num_experts of its size; the router, the
  shared experts and everything else count whole. A dense model: `count_params`.
  """
  boxed = abstract_params(cfg)
  flat, _ = jax.tree_util.tree_flatten_with_path(
    boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)
  )
  total = 0
  for path, leaf in flat:
    keys = [getattr(k, 'key', None) for k in path]
    size = int(nn.unbox(leaf).size)
    routed = (
      len(keys) > 1
      and keys[-2] == 'moe'
      and keys[-1] in ('wi', 'wg', 'wo')
      and 'exp' in getattr(leaf, 'names', ())
    )
    total += size * cfg.experts_per_token // cfg.num_experts if routed else size
  return total


def unstack_layers(params, cfg: ModelConfig):
  """Scanned layout (`block.groups`) -> unrolled {'layers_0': ..., 'layers_{L-1}': ...}."""
  params, first = dict(params), 0
  for group in block_lib.groups(cfg):
    stacked = params.pop(group.name)
    for g in range(group.repeats):
      for j in range(len(group.sparse)):
        unit = stacked if len(group.sparse) == 1 else stacked[f'block_{j}']
        params[f'layers_{first}'] = jax.tree.map(lambda x, g=g: x[g], unit)
        first += 1
  return params


def stack_layers(params, cfg: ModelConfig):
  """Unrolled layout -> scanned layout; the inverse of `unstack_layers`."""
  params, first = dict(params), 0
  for group in block_lib.groups(cfg):
    n = len(group.sparse)
    per_unit = []
    for _ in range(group.repeats):
      blocks = [params.pop(f'layers_{first + j}') for j in range(n)]
      per_unit.append(blocks[0] if n == 1 else {f'block_{j}': b for j, b in enumerate(blocks)})
      first += n
    params[group.name] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_unit)
  return params
