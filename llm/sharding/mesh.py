"""The device mesh, the logical-axis rules, and the shardings of arrays and batches.

The mesh axes and what each splits: `llm/sharding/__init__.py`.
"""

import contextlib
import logging
import math

import flax.linen as nn
import jax
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
        f'The {kind} mesh {describe(sizes)} cannot fill {total} devices: '
        f'{fixed} does not divide {total}.'
      )
    sizes = dict(sizes, **{free[0]: total // fixed})
  if math.prod(sizes.values()) != total:
    raise ValueError(
      f'The {kind} mesh {describe(sizes)} needs {math.prod(sizes.values())} devices, '
      f'but there are {total}; make the product {total} or set one axis to -1.'
    )
  return sizes


def describe(sizes: dict[str, int]) -> str:
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
    grid = _physical_grid(ici, devices)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _physical_grid(ici: dict[str, int], devices) -> np.ndarray:
  """The devices of one slice in the ICI mesh's shape, each axis on whole physical axes if it can.

  A split no product of whole physical axes makes (tensor=4 on a 16x16 v5e,
  8 x 8 on a 4x4x4 v5p) splits a physical axis instead: it runs, with some
  collectives over a partial ring.
  """
  shape = list(ici.values())
  try:
    return mesh_utils.create_device_mesh(shape, devices)
  except NotImplementedError:
    pass
  try:
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except (NotImplementedError, AssertionError, ValueError) as e:
    raise ValueError(
      f'The mesh {describe(ici)} cannot be laid out on these {len(devices)} '
      f'{devices[0].device_kind} devices ({e}); choose other mesh sizes.'
    ) from None
  logging.info('The mesh %s splits physical axes of the topology.', describe(ici))
  return grid


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
      axes = as_axes(rules.get(name))
      size = axes_size(mesh, axes)
      if dim % size:
        where = _AXIS_FIELDS.get(name, f'dimension {name!r} of {jax.tree_util.keystr(path)}')
        rank = list(_AXIS_FIELDS).index(name) if name in _AXIS_FIELDS else len(_AXIS_FIELDS)
        problems.append((rank, where, dim, {a: mesh.shape[a] for a in axes}, size))
  if problems:
    _, where, dim, axes, size = min(problems, key=lambda p: p[0])
    raise ValueError(
      f'{where}={dim} is not divisible by mesh {describe(axes)}; '
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


def as_axes(axes) -> tuple[str, ...]:
  """A PartitionSpec entry (None, a mesh axis or a tuple of them) as a tuple."""
  return (axes,) if isinstance(axes, str) else tuple(axes or ())


def axes_size(mesh, axes) -> int:
  return math.prod(mesh.shape[a] for a in as_axes(axes))


@contextlib.contextmanager
def rules_context(mesh: Mesh):
  """Context in which `nn.with_logical_constraint` in the model takes effect."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    yield
