"""The device mesh, the logical-axis rules, and sharding helpers.

This is the only module that names mesh axes. Everything else speaks in
logical axes: parameters (`embed`, `mlp`, `heads`, `kv_heads`, `head_dim`,
`vocab`, `layers`, `norm`) and activations (`act_batch`, `act_length`,
`act_embed`, `act_heads`, `act_kv_heads`, `act_mlp`, `act_vocab`).

Mesh axes:
  data      pure data parallelism: parameters replicated, batch split.
  fsdp      ZeRO-3: the batch split, and the weights and optimizer state too,
            gathered per layer inside the step.
  sequence  context parallelism: every activation's length split; attention
            gathers the whole row's keys and values (`context_parallel`), causal
            rows reordered first so every chip has as much of the triangle
            (`balance_length`). Weights are split over it as over fsdp.
  expert    expert parallelism: each sparse layer's experts split, the tokens
            gathered and the outputs reduce-scattered (`expert_parallel`).
            Elsewhere one more data-parallel axis splitting weights, like fsdp.
  tensor    Megatron-style: heads, MLP hidden and vocab split; between attention
            and the MLP the residual stream is split on length over it
            (Megatron's sequence parallelism, `act_res_length`): the all-reduce
            after each block becomes a reduce-scatter and an all-gather of the
            same volume, and each chip keeps 1/tensor of the stream.

Each axis has an ICI size (within a slice) and a DCN size (across slices); the
mesh axis is their product. Put `data` on DCN: it only all-reduces gradients
once per step, while fsdp, sequence and tensor communicate every layer.
"""

import contextlib
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'sequence', 'expert', 'tensor')
EXPERT_AXIS = 'expert'
BATCH_AXES = ('data', 'fsdp', EXPERT_AXIS)
SEQUENCE_AXIS = 'sequence'

RULES = (
  # Activations.
  ('act_batch', BATCH_AXES),
  ('act_length', SEQUENCE_AXIS),
  ('act_res_length', (SEQUENCE_AXIS, 'tensor')),  # The residual stream's length.
  ('act_embed', None),
  ('act_heads', 'tensor'),
  ('act_kv_heads', 'tensor'),
  ('act_mlp', 'tensor'),
  ('act_vocab', 'tensor'),
  # Parameters.
  ('embed', ('fsdp', SEQUENCE_AXIS, EXPERT_AXIS)),
  # An expert's weights: split over `expert` by expert, and their model dim
  # over the rest of `embed`'s axes (flax would drop a mesh axis named twice).
  ('exp', EXPERT_AXIS),
  ('exp_embed', ('fsdp', SEQUENCE_AXIS)),
  ('vocab', 'tensor'),
  ('heads', 'tensor'),
  ('kv_heads', 'tensor'),
  ('mlp', 'tensor'),
  ('head_dim', None),
  ('layers', None),
  ('norm', None),
)

# Which config field sets the size of a logical axis, for error messages.
_AXIS_FIELDS = {
  'exp': 'model.num_experts',
  'heads': 'model.num_heads',
  'kv_heads': 'model.num_kv_heads',
  'mlp': 'model.d_ff',
  'embed': 'model.d_model',
  'exp_embed': 'model.d_model',
  'vocab': 'model.vocab_size',
}


def _resolve(sizes: dict[str, int], total: int, kind: str) -> dict[str, int]:
  """Replaces a single -1 by what is left of `total`; checks the product."""
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ValueError(f'Only one {kind} mesh axis may be -1, got {sizes}.')
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if any(s == 0 or s < -1 for s in sizes.values()):
    raise ValueError(f'{kind} mesh sizes must be positive or -1, got {sizes}.')
  if free:
    if total % fixed:
      raise ValueError(
        f'The {kind} mesh {_fmt(sizes)} cannot fill {total} devices: '
        f'{fixed} does not divide {total}.'
      )
    sizes = dict(sizes, **{free[0]: total // fixed})
  if math.prod(sizes.values()) != total:
    raise ValueError(
      f'The {kind} mesh {_fmt(sizes)} needs {math.prod(sizes.values())} devices, '
      f'but there are {total}; make the product {total} or set one axis to -1.'
    )
  return sizes


def _fmt(sizes: dict[str, int]) -> str:
  return ' x '.join(f'{a}={s}' for a, s in sizes.items())


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """A mesh over `devices` (default: all) from `mesh_cfg.{data,fsdp,sequence,tensor}`, `dcn_*`.

  A missing axis has size 1.
  """
  devices = list(jax.devices() if devices is None else devices)
  dcn = {a: int(mesh_cfg.get(f'dcn_{a}', 1)) for a in MESH_AXES}
  num_slices = len({getattr(d, 'slice_index', 0) for d in devices})
  dcn = _resolve(dcn, num_slices, 'DCN')
  ici = {a: int(mesh_cfg.get(a, 1)) for a in MESH_AXES}
  ici = _resolve(ici, len(devices) // num_slices, 'ICI')
  ici_shape, dcn_shape = list(ici.values()), list(dcn.values())
  if num_slices > 1:
    grid = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices)
  elif devices[0].platform == 'cpu':
    grid = np.array(devices).reshape(ici_shape)
  else:
    grid = mesh_utils.create_device_mesh(ici_shape, devices)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def one_device_mesh() -> Mesh:
  """A mesh of the first device alone: what library calls without a mesh run on."""
  return make_mesh({a: 1 for a in MESH_AXES}, jax.devices()[:1])


def mesh_from_spec(spec: str = '') -> Mesh:
  """A mesh from 'data=-1,fsdp=1,sequence=1,tensor=2' (a command-line flag); missing axes are 1.

  An empty spec puts every device on `data`.
  """
  sizes = {axis: 1 for axis in MESH_AXES}
  if not spec:
    return make_mesh(dict(sizes, data=-1))
  for part in spec.split(','):
    name, _, value = part.partition('=')
    if name.strip() not in sizes or not value.strip().lstrip('-').isdigit():
      raise ValueError(
        f'--mesh={spec!r} is not a list like data=-1,fsdp=1,tensor=2 '
        f'(axes: {", ".join(MESH_AXES)}).'
      )
    sizes[name.strip()] = int(value)
  return make_mesh(sizes)


def logical_shardings(boxed_tree, mesh: Mesh):
  """NamedShardings for `nn.LogicallyPartitioned` leaves; leaves without names replicated."""
  check_divisible(boxed_tree, mesh)
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, RULES)


def like_params(tree, abstract_params, param_shardings, mesh: Mesh):
  """Shardings for a tree holding parameter-shaped subtrees, such as optimizer state.

  A leaf whose path ends in a parameter's, with its shape (Adam's moments), is
  sharded like it (FSDP's saving); the rest (step counts) is replicated.
  """
  by_path = {
    _dict_keys(path): (leaf.shape, sharding)
    for (path, leaf), sharding in zip(
      jax.tree_util.tree_leaves_with_path(abstract_params),
      jax.tree.leaves(param_shardings),
      strict=True,
    )
  }

  def pick(path, leaf):
    shape, sharding = by_path.get(_dict_keys(path), (None, None))
    return sharding if shape == getattr(leaf, 'shape', ()) else replicated(mesh)

  return jax.tree_util.tree_map_with_path(pick, tree)


def _dict_keys(path) -> tuple:
  """The trailing run of dict keys of a tree path: a parameter's name inside any wrapper."""
  keys = []
  for k in reversed(path):
    if not isinstance(k, jax.tree_util.DictKey):
      break
    keys.append(k.key)
  return tuple(reversed(keys))


def check_divisible(boxed_tree, mesh: Mesh) -> None:
  """Raises one clear sentence for a dimension its mesh axes do not divide.

  Model-config sizes (heads before kv heads, then MLP, width, vocab) are
  reported before other parameters, so the message names the field to change.
  """
  rules = dict(RULES)
  problems = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(
    boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
  ):
    if not isinstance(leaf, nn.LogicallyPartitioned):
      continue
    for dim, name in zip(leaf.value.shape, leaf.names, strict=True):
      axes = _axes(rules.get(name))
      size = _size(mesh, axes)
      if dim % size:
        where = _AXIS_FIELDS.get(name, f'dimension {name!r} of {jax.tree_util.keystr(path)}')
        rank = list(_AXIS_FIELDS).index(name) if name in _AXIS_FIELDS else len(_AXIS_FIELDS)
        problems.append((rank, where, dim, {a: mesh.shape[a] for a in axes}, size))
  if problems:
    _, where, dim, axes, size = min(problems, key=lambda p: p[0])
    raise ValueError(
      f'{where}={dim} is not divisible by mesh {_fmt(axes)}; '
      f'choose a size that is a multiple of {size} or change the mesh.'
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows split over data x fsdp, sequence replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_divisor(mesh: Mesh) -> int:
  """How many ways a batch's rows are split."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def global_batch(batch: dict, mesh: Mesh) -> dict:
  """This host's rows -> global arrays sharded like `batch_sharding`.

  Each host passes only the rows it read; no host ever holds the global batch.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


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
    tuple(a for a in _axes(axes) if mesh.shape[a] > 1)
    for axes in nn.logical_to_mesh_axes(('vocab', 'embed'), RULES)
  )
  V, D = table_VD.shape
  if (
    not (vocab_axes or embed_axes)
    or tokens_BT.shape[0] % batch_divisor(mesh)
    or V % _size(mesh, vocab_axes)
    or D % _size(mesh, embed_axes)
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


def _axes(axes) -> tuple[str, ...]:
  """A PartitionSpec entry (None, a mesh axis or a tuple of them) as a tuple."""
  return (axes,) if isinstance(axes, str) else tuple(axes or ())


def _size(mesh, axes) -> int:
  return math.prod(mesh.shape[a] for a in _axes(axes))


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
        if dim % _size(mesh, axes):
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
    if dim % _size(mesh, axes):
      raise ValueError(
        f'Context parallelism needs batch rows and heads that the mesh divides: {dim} is '
        f'not divisible by {_fmt({a: mesh.shape[a] for a in _axes(axes)})}.'
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
  chip's experts' contributions. Rows or a length that the mesh does not
  divide (decoding one row) stay whole, and the outputs are summed instead.
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

  def local(x_btd, *args):
    routes_btr, experts_edf = args[: len(routes)], args[len(routes) :]
    if model_axes:
      experts_edf = [
        gather(w, model_axes, axis=d) for w, d in zip(experts_edf, model_dims, strict=True)
      ]
    if rows is not None:  # The tokens of every chip of the expert group.
      x_btd, routes_btr = gather(x_btd, EXPERT_AXIS), [gather(r, EXPERT_AXIS) for r in routes_btr]
    first = jax.lax.axis_index(EXPERT_AXIS) * experts_edf[0].shape[0]
    y_btd = jax.lax.psum(fn(x_btd, *routes_btr, *experts_edf, first), 'tensor')
    if rows is None:
      return jax.lax.psum(y_btd, EXPERT_AXIS)
    return jax.lax.psum_scatter(y_btd, EXPERT_AXIS, scatter_dimension=0, tiled=True)

  tokens, inner = PartitionSpec(rows, length), model_axes or None
  weights = [
    PartitionSpec(EXPERT_AXIS, *((inner, 'tensor') if d == 1 else ('tensor', inner)))
    for d in model_dims
  ]
  return jax.shard_map(
    local, in_specs=(tokens, *(tokens,) * len(routes), *weights), out_specs=tokens
  )(x_BTD, *routes, *experts)


@contextlib.contextmanager
def rules_context(mesh: Mesh):
  """Context in which `nn.with_logical_constraint` in the model takes effect."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    yield
