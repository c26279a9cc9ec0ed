"""Expert parallelism: the expert axis splits the experts and changes no number."""

import functools
import re

import jax
import numpy as np
import pytest

from llm import losses, sharding, train
from tests import moe_test
from tests.train_test import _losses, tiny_config

MOE = {
  'model.num_experts': 4,
  'model.experts_per_token': 2,
  'model.moe_d_ff': 64,
  'model.num_shared_experts': 1,
}


def _batch(c):
  return moe_test.batch(c.batch_size, c.seq_len)


def _loss_and_grads(c, devices, params, batch):
  trainer = train.Trainer.create(c, devices)
  fn = functools.partial(losses.train_sums, moe_aux_loss=0.01, router_z_loss=1e-3)
  grad_fn = jax.jit(
    jax.value_and_grad(fn, has_aux=True),
    static_argnums=2,
    in_shardings=(trainer.shardings['params'], sharding.batch_sharding(trainer.mesh)),
    out_shardings=sharding.replicated(trainer.mesh),
  )
  with sharding.rules_context(trainer.mesh):
    params = jax.device_put(params, trainer.shardings['params'])
    (objective, (nll, _, stats)), grads = grad_fn(params, batch, trainer.model_cfg)
  return [float(objective), float(nll)], jax.device_get(stats), jax.device_get(grads)


MESHES = [
  {'mesh.data': 1, 'mesh.fsdp': 2, 'mesh.expert': 2, 'mesh.tensor': 2},
  {'mesh.data': 1, 'mesh.fsdp': 2, 'mesh.expert': 4, 'mesh.tensor': 1},
  {'mesh.data': 2, 'mesh.fsdp': 1, 'mesh.expert': 4, 'mesh.tensor': 1},
  {'mesh.data': 2, 'mesh.fsdp': 1, 'mesh.expert': 2, 'mesh.tensor': 2},
]


# Each mesh once, the two dispatch paths spread over them (compiles are slow on CPU).
CASES = [(MESHES[0], 0.0), (MESHES[0], 1.0), (MESHES[1], 0.0), (MESHES[2], 1.0), (MESHES[3], 0.0)]


@pytest.mark.parametrize(
  'mesh, capacity_factor',
  CASES,
  ids=[
    f'{"x".join(str(v) for v in m.values())}-{"capacity" if f else "dropless"}' for m, f in CASES
  ],
)
def test_expert_axis_gives_the_loss_and_gradients_of_one_device(mesh, capacity_factor):
  fields = {**MOE, 'model.capacity_factor': capacity_factor}
  c = tiny_config(**fields, **mesh)
  one = tiny_config(**fields, **{'mesh.data': 1})
  params = train.Trainer.create(one, jax.devices()[:1]).init_state()['params']
  batch = _batch(c)
  want = _loss_and_grads(one, jax.devices()[:1], params, batch)
  got = _loss_and_grads(c, jax.devices(), params, batch)
  np.testing.assert_allclose(got[0], want[0], rtol=2e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), got[1], want[1])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6, rtol=2e-5), got[2], want[2])
  if capacity_factor:
    assert got[1]['dropped_fraction'] > 0  # Capacity 1.0 drops some of a random router's picks.


def test_a_dropless_buffer_bound_shrinks_the_expert_rows_and_counts_its_drops():
  """Bounded at the expert group's size it changes nothing; at the fair share it drops."""
  mesh = MESHES[1]  # expert=4, one expert per chip.
  c = tiny_config(**MOE, **mesh)
  params = train.Trainer.create(c, jax.devices()).init_state()['params']
  batch = _batch(c)
  unbounded = _loss_and_grads(c, jax.devices(), params, batch)
  whole = tiny_config(**MOE, **mesh, **{'model.expert_buffer_factor': 4.0})
  np.testing.assert_array_equal(
    _loss_and_grads(whole, jax.devices(), params, batch)[0], unbounded[0]
  )
  fair = tiny_config(**MOE, **mesh, **{'model.expert_buffer_factor': 1.0})
  got = _loss_and_grads(fair, jax.devices(), params, batch)
  assert 0 < got[1]['dropped_fraction'] < 0.5 and got[0][1] != unbounded[0][1]
  trainer = train.Trainer.create(fair, jax.devices())
  with sharding.rules_context(trainer.mesh):
    jaxpr = str(jax.make_jaxpr(trainer.step_fn)(trainer.abstract_state(), batch))
  # Per chip: (8 rows / 8 chips x 4 gathered) x 32 tokens x 2 routes = 256 copies, 64 kept.
  rows = {int(m) for m in re.findall(r'f32\[(\d+),\d+\](?:\{[^}]*\})? = ragged_dot', jaxpr)}
  assert rows == {64}, rows


def test_expert_weights_and_their_moments_are_split_over_the_expert_axis():
  c = tiny_config(**MOE, **MESHES[0])
  state = train.Trainer.create(c, jax.devices()).init_state()
  # [L, E, D, F]: layers whole, experts over `expert`, width over fsdp, hidden over tensor.
  split = ('fsdp', 'sequence')
  want = {
    'wi': (None, 'expert', split, 'tensor'),
    'wg': (None, 'expert', split, 'tensor'),
    'wo': (None, 'expert', 'tensor', split),
  }
  seen = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    keys = [getattr(k, 'key', None) for k in path]
    if keys[-2:-1] == ['moe'] and keys[-1] in want:  # The params and both Adam moments.
      assert tuple(leaf.sharding.spec) == want[keys[-1]], (keys, leaf.sharding.spec)
      assert leaf.addressable_shards[0].data.shape[1] == c.model.num_experts // 2
      seen.append(keys[-1])
  assert sorted(seen) == sorted(list(want) * 3), seen


def test_the_step_runs_the_ring_of_experts():
  """Fails if the experts were computed replicated: the ring's collectives are in the step."""
  c = tiny_config(**MOE, **MESHES[1])
  trainer = train.Trainer.create(c, jax.devices())
  with sharding.rules_context(trainer.mesh):
    jaxpr = str(jax.make_jaxpr(trainer.step_fn)(trainer.abstract_state(), _batch(c)))
  collectives = re.findall(r"(all_gather|reduce_scatter)\[[^\]]*axis_name=\('(\w+)',\)", jaxpr)
  # Tokens gathered and outputs scattered over the expert axis, forward and backward.
  assert collectives.count(('all_gather', 'expert')) >= 2, collectives
  assert collectives.count(('reduce_scatter', 'expert')) >= 2, collectives


def test_three_train_steps_match_one_device():
  c = tiny_config(**MOE, **MESHES[0])
  one = tiny_config(**MOE, **{'mesh.data': 1})
  _, _, got = _losses(c, jax.devices())
  _, _, want = _losses(one, jax.devices()[:1])
  np.testing.assert_allclose(got, want, rtol=2e-5)


def test_an_expert_axis_that_does_not_divide_the_experts_is_one_sentence():
  c = tiny_config(**{**MOE, 'model.num_experts': 6}, **{'mesh.data': 2, 'mesh.expert': 4})
  with pytest.raises(ValueError, match=r'model.num_experts=6 is not divisible by mesh expert=4'):
    train.Trainer.create(c, jax.devices())
