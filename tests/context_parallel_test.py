"""Context parallelism: the sequence axis splits the length and changes no number.

The batches are packed rows whose documents cross the shards' chunk
boundaries, with padding, so that the load-balancing reorder, the gathered
keys and the masks by true position are all exercised.
"""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from llm import losses, sharding, train
from llm.model import flash, kernels, layers
from tests.train_test import _losses, tiny_config

T = 32


def _packed_batch(c, seed=0):
  """Rows of 2-3 documents of random lengths, the last row ending in padding."""
  rng = np.random.default_rng(seed)
  B = c.batch_size
  inputs = rng.integers(1, c.model.vocab_size, (B, T), dtype=np.int32)
  segments, positions = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
  for b in range(B):
    cuts = np.sort(rng.choice(np.arange(3, T - 3), 2, replace=False))
    end = T - 5 if b == B - 1 else T
    for s, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, end], strict=True)):
      segments[b, lo:hi], positions[b, lo:hi] = s + 1, np.arange(hi - lo)
  mask = (segments != 0).astype(np.float32)
  mask[:, ::7] = 0.0  # Some real tokens outside the loss, too.
  return {
    'inputs': inputs,
    'targets': np.roll(inputs, -1, axis=1),
    'segment_ids': segments,
    'positions': positions,
    'loss_mask': mask,
  }


def _loss_and_grads(c, devices, params, batch, z_loss):
  trainer = train.Trainer.create(c, devices)
  grad_fn = jax.jit(
    jax.value_and_grad(functools.partial(losses.train_sums, z_loss=z_loss), has_aux=True),
    static_argnums=2,
    in_shardings=(trainer.shardings['params'], sharding.batch_sharding(trainer.mesh)),
    out_shardings=sharding.replicated(trainer.mesh),
  )
  with sharding.rules_context(trainer.mesh):
    params = jax.device_put(params, trainer.shardings['params'])
    (objective, (nll, tokens, _)), grads = grad_fn(params, batch, trainer.model_cfg)
  return float(objective), float(nll), float(tokens), jax.device_get(grads)


MESHES = [
  {'mesh.data': 1, 'mesh.fsdp': 2, 'mesh.sequence': 2, 'mesh.tensor': 2},
  {'mesh.data': 1, 'mesh.fsdp': 2, 'mesh.sequence': 4, 'mesh.tensor': 1},
  {'mesh.data': 2, 'mesh.fsdp': 1, 'mesh.sequence': 4, 'mesh.tensor': 1},
]


@pytest.mark.parametrize('mesh', MESHES, ids=lambda m: 'x'.join(str(v) for v in m.values()))
@pytest.mark.parametrize('impl', ['xla', 'blockwise'])
def test_sequence_axis_gives_the_loss_and_gradients_of_one_device(mesh, impl, monkeypatch):
  monkeypatch.setattr(flash, 'DEFAULT_BLOCK', 4)  # Several key blocks per shard.
  c = tiny_config(seq_len=T, **{'model.attention_impl': impl, **mesh})
  one = tiny_config(seq_len=T, **{'model.attention_impl': 'xla', 'mesh.data': 1})
  params = train.Trainer.create(one, jax.devices()[:1]).init_state()['params']
  batch = _packed_batch(c)
  want = _loss_and_grads(one, jax.devices()[:1], params, batch, z_loss=1e-3)
  got = _loss_and_grads(c, jax.devices(), params, batch, z_loss=1e-3)
  np.testing.assert_allclose(got[:3], want[:3], rtol=2e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6, rtol=2e-5), got[3], want[3])


def test_activations_are_split_on_length(monkeypatch):
  """The residual stream over sequence x tensor, attention's queries over sequence."""
  mesh = MESHES[0]
  c = tiny_config(seq_len=T, **mesh)
  seen = {}

  def record(name):
    return lambda s: seen.setdefault(name, s.spec)

  constrain, attention_kernel = layers.constrain, kernels.attention_kernel

  def constrain_and_record(x, axes):
    x = constrain(x, axes)
    if axes == layers.BTD:
      jax.debug.inspect_array_sharding(x, callback=record('residual'))
    return x

  def kernel_and_record(cfg, q, *args):
    jax.debug.inspect_array_sharding(q, callback=record('queries'))
    out = attention_kernel(cfg, q, *args)
    jax.debug.inspect_array_sharding(out, callback=record('attention'))
    return out

  monkeypatch.setattr(layers, 'constrain', constrain_and_record)
  monkeypatch.setattr(kernels, 'attention_kernel', kernel_and_record)
  trainer = train.Trainer.create(c, jax.devices())
  with sharding.rules_context(trainer.mesh):
    jaxpr = str(jax.make_jaxpr(trainer.step_fn)(trainer.abstract_state(), _packed_batch(c)))
  trainer.step(trainer.init_state(), _packed_batch(c))
  assert seen['residual'][1] == ('sequence', 'tensor'), seen
  assert seen['queries'][1] == 'sequence' and seen['queries'][2] == 'tensor', seen
  assert seen['attention'][1] == 'sequence', seen
  assert 'all_gather' in jaxpr  # Keys and values of the whole row.


def test_three_train_steps_match_one_device():
  c = tiny_config(seq_len=T, **MESHES[0])
  one = tiny_config(seq_len=T, **{'mesh.data': 1})
  _, _, got = _losses(c, jax.devices())
  _, _, want = _losses(one, jax.devices()[:1])
  np.testing.assert_allclose(got, want, rtol=2e-5)


def test_balance_order_pairs_the_front_with_the_back():
  order = sharding.balance_order(16, 2)
  assert order.tolist() == [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11]
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 1, 'sequence': 4})
  x = np.arange(2 * 16).reshape(2, 16)
  with sharding.rules_context(mesh):
    got = jax.jit(lambda b: sharding.balance_length(b)['inputs'])({'inputs': x})
  np.testing.assert_array_equal(got, x[:, sharding.balance_order(16, 4)])
  assert got.sharding.spec[1] == 'sequence'


def test_a_length_the_sequence_axis_cannot_split_is_one_sentence():
  c = tiny_config(seq_len=36, **{'mesh.data': 1, 'mesh.fsdp': 2, 'mesh.sequence': 4})
  with pytest.raises(ValueError, match=r'seq_len=36 cannot be split over mesh.sequence=4'):
    train.Trainer.create(c, jax.devices())


def test_weights_are_split_over_fsdp_and_sequence():
  c = tiny_config(seq_len=T, **MESHES[0])
  trainer = train.Trainer.create(c, jax.devices())
  spec = trainer.shardings['params']['layers']['mlp']['wi'].spec
  assert spec == P(None, ('fsdp', 'sequence', 'expert'), 'tensor')
  assert isinstance(trainer.shardings['params']['embedding'], NamedSharding)


def test_a_tpu_train_step_with_the_length_split_compiles_with_splash():
  """Splash's context-parallel form, lowered by the TPU compiler itself (AOT, no TPU)."""
  pytest.importorskip('libtpu', reason='TPU topologies need libtpu: requirements-tpu.txt')
  from llm import compile as compile_lib

  mesh = {'mesh.data': 1, 'mesh.fsdp': 2, 'mesh.sequence': 2, 'mesh.tensor': 1}
  c = tiny_config(**{'model.dtype': 'bfloat16', 'model.remat': 'full', **mesh}, seq_len=512)
  c.model.max_seq_len = 512
  report = compile_lib.compile_train_step(c, compile_lib.topology_devices('v5e:2x2'))
  hlo = report.compiled.as_text()
  for kernel in ('splash_mha_fwd', 'splash_mha_dq', 'splash_mha_dkv', 'all-gather'):
    assert kernel in hlo, kernel
