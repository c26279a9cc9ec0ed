"""Optimizer: schedules' shapes and the weight-decay mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm import config as config_lib
from llm import optim


def _optim(**overrides):
  c = config_lib.get_config().optim
  c.update(overrides)
  return c


def test_cosine_warms_up_linearly_then_decays_to_the_floor():
  s = optim.make_schedule(_optim(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1), 110)
  np.testing.assert_allclose([s(0), s(5), s(10)], [0.0, 0.5, 1.0], atol=1e-6)
  np.testing.assert_allclose(s(60), 0.1 + 0.9 * 0.5, atol=1e-6)  # Halfway down the cosine.
  np.testing.assert_allclose(s(110), 0.1, atol=1e-6)


def test_linear_and_constant_schedules():
  lin = optim.make_schedule(
    _optim(schedule='linear', learning_rate=1.0, warmup_steps=0, min_lr_ratio=0.0), 100
  )
  np.testing.assert_allclose([lin(0), lin(50), lin(100)], [1.0, 0.5, 0.0], atol=1e-6)
  const = optim.make_schedule(_optim(schedule='constant', learning_rate=2.0, warmup_steps=4), 100)
  np.testing.assert_allclose([const(2), const(4), const(99)], [1.0, 2.0, 2.0], atol=1e-6)


def test_warmup_stable_decay_holds_the_peak_then_decays_over_the_last_fraction():
  c = _optim(schedule='wsd', learning_rate=1.0, warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0)
  s = optim.make_schedule(c, 110)
  np.testing.assert_allclose([s(10), s(50), s(90)], [1.0, 1.0, 1.0], atol=1e-6)
  np.testing.assert_allclose([s(100), s(110)], [0.5, 0.0], atol=1e-6)


def test_weight_decay_skips_norms_biases_and_embeddings_by_default():
  params = {
    'embedding': jnp.ones((4, 2)),
    'unembed': jnp.ones((2, 4)),
    'layers': {
      'attn': {'q': jnp.ones((2, 2, 2)), 'q_bias': jnp.ones((2, 2))},
      'attn_norm': {'scale': jnp.ones((2, 2)), 'bias': jnp.ones((2, 2))},
    },
  }
  mask = optim.decay_mask(_optim(), params)
  assert mask == {
    'embedding': False,
    'unembed': True,
    'layers': {
      'attn': {'q': True, 'q_bias': False},
      'attn_norm': {'scale': False, 'bias': False},
    },
  }
  everything = optim.decay_mask(_optim(decay_embeddings=True, decay_norms_and_biases=True), params)
  assert all(jax.tree.leaves(everything))


def test_decoupled_weight_decay_shrinks_kernels_without_gradient():
  params = {'w': jnp.ones((2, 2)), 'embedding': jnp.ones((2, 2))}
  tx, _ = optim.make_optimizer(
    _optim(learning_rate=0.1, warmup_steps=0, schedule='constant', weight_decay=0.5), 10
  )
  zero = {'w': jnp.zeros((2, 2)), 'embedding': jnp.zeros((2, 2))}
  updates, _ = tx.update(zero, tx.init(params), params)
  np.testing.assert_allclose(updates['w'], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_allclose(updates['embedding'], 0.0)


def test_bad_warmup_is_named():
  with pytest.raises(ValueError, match='optim.warmup_steps=200'):
    optim.make_schedule(_optim(warmup_steps=200), 100)
