"""The model's `shard_map` layers: each names the collectives of one kind of parallelism.

The embedding lookup from a split table, kernels run per shard, context
parallelism's reordered rows and gathered keys, and the ring of experts.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from llm.sharding.mesh import (
  BATCH_AXES,
  EXPERT_AXIS,
  RULES,
  SEQUENCE_AXIS,
  Mesh,
  as_axes,
  axes_size,
  batch_divisor,
  describe,
)


def embedding_lookup(table_VD: jax.Array, tokens_BT: jax.Array) -> jax.Array:
  """table_VD[tokens_BT] without gathering the table, which stays split as its params are.

  XLA cannot partition a gather from a table split along D (fsdp): it would
  replicate the table and its gradient (4 GiB for Llama-3-8B's). Instead each
  device looks the ids of the group splitting D up (all-gathered, int32) in
  its own [V / tensor, D / group] block, rows of other vocab shards are zero
  and summed over `tensor` (Megatron's vocab-parallel embedding), and an
  all-to-all hands each device its own tokens' rows with all of D; the
  gradient is a scatter-add. Without a split table or divisible batch: a take.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return jnp.take(table_VD, tokens_BT, axis=0)
  vocab_axes, embed_axes = (
    tuple(a for a in as_axes(axes) if mesh.shape[a] > 1)
    for axes in nn.logical_to_mesh_axes(('vocab', 'embed'), RULES)
  )
  V, D = table_VD.shape
  if (
    not (vocab_axes or embed_axes)
    or tokens_BT.shape[0] % batch_divisor(mesh)
    or V % axes_size(mesh, vocab_axes)
    or D % axes_size(mesh, embed_axes)
  ):
    return jnp.take(nn.with_logical_constraint(table_VD, ('vocab', None)), tokens_BT, axis=0)

  def lookup(table_vd, tokens_bt):
    if embed_axes:  # The ids of every device that holds a slice of the same rows.
      tokens_bt = jax.lax.all_gather(tokens_bt, embed_axes, axis=0, tiled=True)
    if vocab_axes:
      ids_bt = tokens_bt - jax.lax.axis_index(vocab_axes) * table_vd.shape[0]
      mine_bt = (ids_bt >= 0) & (ids_bt < table_vd.shape[0])
      rows_btd = jnp.take(table_vd, jnp.where(mine_bt, ids_bt, 0), axis=0)
      rows_btd = jax.lax.psum(jnp.where(mine_bt[..., None], rows_btd, 0), vocab_axes)
    else:
      rows_btd = jnp.take(table_vd, tokens_bt, axis=0)
    if embed_axes:  # [rows of the group, D / (fsdp x sequence)] -> [own rows, D].
      rows_btd = jax.lax.all_to_all(rows_btd, embed_axes, 0, 2, tiled=True)
    return rows_btd

  # Each device looks up its own tokens: the length split as the activations'
  # are, or whole rows where the sequence axis does not divide it (decoding).
  length = SEQUENCE_AXIS if tokens_BT.shape[1] % mesh.shape[SEQUENCE_AXIS] == 0 else None
  return jax.shard_map(
    lookup,
    in_specs=(
      PartitionSpec(vocab_axes or None, embed_axes or None),
      PartitionSpec(BATCH_AXES, length),
    ),
    out_specs=PartitionSpec(BATCH_AXES, length),
    # Whole rows are the same on every device of the sequence axis, which the
    # gather over it hides from shard_map's check.
    check_vma=length is not None or mesh.shape[SEQUENCE_AXIS] == 1,
  )(table_VD, tokens_BT)


def per_shard(fn, in_axes: tuple, out_axes: tuple[str | None, ...]):
  """`fn` run on each device's shard of its array arguments, split by logical axis names.

  For kernels that must see whole rows and heads: a Pallas call (XLA would run
  it on operands gathered onto every device), or a loop whose branches depend
  on this device's rows. `in_axes`: logical names per argument. Without a
  mesh, or with a dimension its axes do not divide, `fn` itself.
  """

  def run(*args):
    mesh = jax.sharding.get_abstract_mesh()
    if _is_local(mesh):
      return fn(*args)
    specs = tuple(nn.logical_to_mesh_axes(axes, RULES) for axes in in_axes)
    for spec, x in zip(specs, args, strict=True):
      for dim, axes in zip(x.shape, spec, strict=False):
        if dim % axes_size(mesh, axes):
          return fn(*args)
    out_spec = nn.logical_to_mesh_axes(out_axes, RULES)
    # Pallas calls carry no varying-axes types, so shard_map cannot check them.
    return jax.shard_map(fn, in_specs=specs, out_specs=out_spec, check_vma=False)(*args)

  return run


def _is_local(mesh) -> bool:
  """No mesh, or inside a shard_map over all of it: arrays are this device's own."""
  return mesh.empty or len(mesh.manual_axes) == len(mesh.axis_names)


def sequence_shards() -> int:
  """How many ways activations are split on length here: the sequence axis (1: no mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if _is_local(mesh) else mesh.shape[SEQUENCE_AXIS]


def check_length(seq_len: int, mesh: Mesh) -> None:
  """Stops on a length that the sequence axis cannot split into its balanced chunks."""
  shards = mesh.shape[SEQUENCE_AXIS]
  if shards > 1 and seq_len % (2 * shards):
    raise ValueError(
      f'seq_len={seq_len} cannot be split over mesh.sequence={shards}: context parallelism '
      f'cuts each row into 2 x {shards} = {2 * shards} chunks; make seq_len a multiple of '
      f'{2 * shards} or change mesh.sequence.'
    )


def balance_order(seq_len: int, shards: int) -> np.ndarray:
  """The positions in load-balanced order: chunk i, then chunk 2S-1-i, for shard i = 0..S-1.

  Under a causal mask the end of a row attends to far more than its start;
  paired front with back, every chip's queries see the same number of keys.
  """
  chunks = np.arange(seq_len).reshape(2 * shards, -1)
  order = [c for i in range(shards) for c in (i, 2 * shards - 1 - i)]
  return chunks[order].reshape(-1)


def balance_length(batch: dict) -> dict:
  """Every [B, T] array of `batch` in `balance_order` when the length is split; else `batch`.

  Inputs, targets, positions, segment ids and masks move alike, so losses are
  unchanged; only kernels that apply causality by array index (splash) must
  know (RoPE and the other masks read true positions). A classifier's one
  position per row stays, and its `logits_index` follows the reorder.
  """
  shards = sequence_shards()
  T = batch['inputs'].shape[1]
  if shards == 1:
    return batch
  order_T = balance_order(T, shards)

  def reorder(x):
    if x.ndim != 2 or x.shape[1] != T:
      return x
    return nn.with_logical_constraint(x[:, order_T], ('act_batch', 'act_length'))

  out = {k: reorder(v) for k, v in batch.items()}
  if 'logits_index' in batch:
    out['logits_index'] = jnp.asarray(np.argsort(order_T), jnp.int32)[batch['logits_index']]
  return out


def context_parallel(fn, q_BTNH, k_BTKH, v_BTKH, positions_BT, segment_ids_BT):
  """Attention with the length split over the sequence axis: `fn` per device on its queries.

  Each device keeps its queries and all-gathers the whole row's keys, values,
  positions and segment ids (MaxText's default; the gather's gradient is a
  reduce-scatter). `fn(q_btnh, k_bskh, v_bskh, q_positions_bt, kv_positions_bs,
  q_segment_ids_bt, kv_segment_ids_bs, shard)`: the gathered arrays in
  `balance_order`, and `shard`, this device's index on the axis.
  """
  mesh = jax.sharding.get_abstract_mesh()
  # One name at a time: as one spec, a mesh axis named twice is dropped the second time.
  rows, heads, kv_heads, length = (
    nn.logical_to_mesh_axes((name,), RULES)[0]
    for name in ('act_batch', 'act_heads', 'act_kv_heads', 'act_length')
  )
  checks = ((q_BTNH.shape[0], rows), (q_BTNH.shape[2], heads), (k_BTKH.shape[2], kv_heads))
  for dim, axes in checks:
    if dim % axes_size(mesh, axes):
      raise ValueError(
        f'Context parallelism needs batch rows and heads that the mesh divides: {dim} is '
        f'not divisible by {describe({a: mesh.shape[a] for a in as_axes(axes)})}.'
      )

  def local(q_btnh, k_btkh, v_btkh, positions_bt, segment_ids_bt):
    gather = functools.partial(jax.lax.all_gather, axis_name=SEQUENCE_AXIS, axis=1, tiled=True)
    shard = jax.lax.axis_index(SEQUENCE_AXIS)
    return fn(
      q_btnh,
      gather(k_btkh),
      gather(v_btkh),
      positions_bt,
      gather(positions_bt),
      segment_ids_bt,
      gather(segment_ids_bt),
      shard,
    )

  q_spec = PartitionSpec(rows, length, heads, None)
  kv_spec = PartitionSpec(rows, length, kv_heads, None)
  row_spec = PartitionSpec(rows, length)
  # Pallas calls carry no varying-axes types, so shard_map cannot check them.
  return jax.shard_map(
    local,
    in_specs=(q_spec, kv_spec, kv_spec, row_spec, row_spec),
    out_specs=q_spec,
    check_vma=False,
  )(q_BTNH, k_BTKH, v_BTKH, positions_BT, segment_ids_BT)


def expert_parallel(fn, x_BTD, routes: tuple, experts: tuple):
  """A mixture-of-experts layer with its experts split over the expert axis.

  The "ring of experts" of MaxText and Levanter, in collectives every backend
  runs: each chip all-gathers the tokens (and routes) of its expert group,
  computes what its own experts contribute, and the outputs are
  reduce-scattered back to the tokens' chips. The expert weights (inputs
  [E, D, F], then the output [E, F, D]) arrive split by expert, by model dim
  over fsdp x sequence (gathered here, per layer, as FSDP does) and by hidden
  dim over tensor (the output's partial sums are added over it).
  `fn(x_btd, *routes_btr, *experts, first_expert)` returns the sum of this
  chip's experts' contributions and a count (of dropped copies), summed here
  over the chips. Rows or a length that the mesh does not divide (decoding
  one row) stay whole, and the outputs are summed instead.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if _is_local(mesh):
    return fn(x_BTD, *routes, *experts, 0)
  if experts[0].shape[0] % mesh.shape[EXPERT_AXIS]:
    raise ValueError(
      f'model.num_experts={experts[0].shape[0]} is not divisible by mesh '
      f'expert={mesh.shape[EXPERT_AXIS]}; choose a multiple of it or change mesh.expert.'
    )
  B, T, _ = x_BTD.shape
  rows = BATCH_AXES if B % batch_divisor(mesh) == 0 else None
  length = SEQUENCE_AXIS if T % mesh.shape[SEQUENCE_AXIS] == 0 else None
  model_axes = tuple(a for a in ('fsdp', SEQUENCE_AXIS) if mesh.shape[a] > 1)
  model_dims = (1,) * (len(experts) - 1) + (2,)
  gather = functools.partial(jax.lax.all_gather, axis=0, tiled=True)
  token_axes = tuple(dict.fromkeys((EXPERT_AXIS, *(rows or ()), *as_axes(length))))

  def local(x_btd, *args):
    routes_btr, experts_edf = args[: len(routes)], args[len(routes) :]
    if model_axes:
      experts_edf = [
        gather(w, model_axes, axis=d) for w, d in zip(experts_edf, model_dims, strict=True)
      ]
    if rows is not None:  # The tokens of every chip of the expert group.
      x_btd, routes_btr = gather(x_btd, EXPERT_AXIS), [gather(r, EXPERT_AXIS) for r in routes_btr]
    first = jax.lax.axis_index(EXPERT_AXIS) * experts_edf[0].shape[0]
    y_btd, count = fn(x_btd, *routes_btr, *experts_edf, first)
    y_btd, count = jax.lax.psum(y_btd, 'tensor'), jax.lax.psum(count, token_axes)
    if rows is None:
      return jax.lax.psum(y_btd, EXPERT_AXIS), count
    return jax.lax.psum_scatter(y_btd, EXPERT_AXIS, scatter_dimension=0, tiled=True), count

  tokens, inner = PartitionSpec(rows, length), model_axes or None
  weights = [
    PartitionSpec(EXPERT_AXIS, *((inner, 'tensor') if d == 1 else ('tensor', inner)))
    for d in model_dims
  ]
  return jax.shard_map(
    local,
    in_specs=(tokens, *(tokens,) * len(routes), *weights),
    out_specs=(tokens, PartitionSpec()),
  )(x_BTD, *routes, *experts)
