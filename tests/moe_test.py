"""Mixture of experts: both dispatch paths against a loop over the experts, and the routing."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm import losses
from llm.config import ModelConfig
from llm.model import Transformer, block, moe, stack_layers, unstack_layers

CFG = ModelConfig(
  vocab_size=64,
  num_layers=2,
  d_model=32,
  num_heads=4,
  num_kv_heads=2,
  d_ff=48,
  max_seq_len=32,
  num_experts=4,
  experts_per_token=2,
  moe_d_ff=24,
)


def batch(B=2, T=16, seed=0):
  """Random rows, the last ending in padding."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(1, 64, (B, T), dtype=np.int32)
  segments = np.ones((B, T), np.int32)
  segments[-1, T - 3 :] = 0  # Padding at the end of the last row.
  return {
    'inputs': inputs,
    'targets': np.roll(inputs, -1, axis=1),
    'segment_ids': segments,
    'positions': np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
    'loss_mask': (segments > 0).astype(np.float32),
  }


def _params(cfg, seed=0):
  tokens = jnp.ones((1, 8), jnp.int32)
  return nn.unbox(Transformer(cfg).init(jax.random.key(seed), tokens)['params'])


_GRAD = jax.jit(
  jax.value_and_grad(losses.train_sums, has_aux=True),
  static_argnums=2,
  static_argnames=('moe_aux_loss', 'router_z_loss'),
)


def _loss_and_grads(cfg, params, rows, **weights):
  (objective, (_, _, stats)), grads = _GRAD(params, rows, cfg, **weights)
  return objective, stats, grads


def _reference_moe(cfg, p, x_BTD):
  """The sparse MLP as a loop over every expert on every token, weighted by the router."""
  x = x_BTD.astype(jnp.float32)
  probs = jax.nn.softmax(x @ p['router'], axis=-1)
  weights, chosen = jax.lax.top_k(probs, cfg.experts_per_token)
  if cfg.router_renormalize:
    weights /= weights.sum(-1, keepdims=True)
  out = 0.0
  for e in range(cfg.num_experts):
    h = jax.nn.silu(x @ p['wg'][e]) * (x @ p['wi'][e])
    gate = jnp.sum(jnp.where(chosen == e, weights, 0.0), axis=-1, keepdims=True)
    out += gate * (h @ p['wo'][e])
  return out


def _assert_trees_close(a, b, **tol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **tol), a, b)


@pytest.mark.parametrize('renormalize', [True, False])
def test_both_paths_equal_a_loop_over_the_experts(renormalize):
  cfg = dataclasses.replace(CFG, router_renormalize=renormalize)
  params = _params(cfg)
  p = jax.tree.map(lambda x: x[0], params['layers']['moe'])
  x_BTD = jax.random.normal(jax.random.key(1), (2, 16, cfg.d_model))
  valid = jnp.ones((2, 16))
  want = _reference_moe(cfg, p, x_BTD)
  for capacity_factor in (0.0, float(cfg.num_experts)):
    c = dataclasses.replace(cfg, capacity_factor=capacity_factor)
    got, stats = moe.Moe(c).apply({'params': p}, x_BTD, valid)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert float(stats['dropped_fraction']) == 0.0


def test_dropless_and_capacity_give_the_same_loss_and_gradients():
  params, rows = _params(CFG), batch()
  weights = dict(moe_aux_loss=0.01, router_z_loss=0.001)
  dropless = _loss_and_grads(CFG, params, rows, **weights)
  full = dataclasses.replace(CFG, capacity_factor=float(CFG.num_experts))
  capacity = _loss_and_grads(full, params, rows, **weights)
  np.testing.assert_allclose(dropless[0], capacity[0], rtol=1e-6)
  _assert_trees_close(dropless[1], capacity[1], rtol=1e-6)
  _assert_trees_close(dropless[2], capacity[2], atol=1e-6, rtol=1e-5)


def test_top1_of_one_expert_is_the_dense_model():
  sparse = dataclasses.replace(CFG, num_experts=1, experts_per_token=1, moe_d_ff=CFG.d_ff)
  dense = dataclasses.replace(
    CFG, num_experts=0, experts_per_token=2, moe_d_ff=0, router_renormalize=True
  )
  params, rows = _params(sparse), batch()
  dense_params = jax.tree.map(lambda x: x, dict(params))
  layers_ = dict(params['layers'])
  experts = layers_.pop('moe')
  layers_['mlp'] = {k: experts[k][:, 0] for k in ('wi', 'wg', 'wo')}
  dense_params['layers'] = layers_
  got = _loss_and_grads(sparse, params, rows)
  want = _loss_and_grads(dense, dense_params, rows)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  grads = got[2]['layers']['moe']
  for k in ('wi', 'wg', 'wo'):
    np.testing.assert_allclose(grads[k][:, 0], want[2]['layers']['mlp'][k], atol=1e-6)
  # One expert has all the probability: the router gets no gradient from the loss.
  np.testing.assert_allclose(grads['router'], 0.0, atol=1e-7)


def test_capacity_drops_the_overflow_in_rank_order():
  E, C = 2, 2
  experts_BTR = jnp.array([[[0, 1], [0, 1], [0, 1], [1, 0]]])
  slots = moe._slots(experts_BTR, jnp.ones((1, 4)), E, C)
  # First choices queue first: expert 0 takes tokens 0 and 1, expert 1 token 3
  # and then token 0's second choice; the rest overflow.
  np.testing.assert_array_equal(slots, [[[0, 1], [1, -1], [-1, -1], [0, -1]]])


def test_padding_takes_no_slot_and_no_share_of_the_statistics():
  cfg = dataclasses.replace(CFG, capacity_factor=1.0)
  p = jax.tree.map(lambda x: x[0], _params(cfg)['layers']['moe'])
  x = jax.random.normal(jax.random.key(2), (1, 16, cfg.d_model))
  valid = jnp.ones((1, 16)).at[0, 8:].set(0.0)
  _, stats = moe.Moe(cfg).apply({'params': p}, x, valid)
  _, half = moe.Moe(cfg).apply({'params': p}, x[:, :8], jnp.ones((1, 8)))
  # The same tokens with their capacity per row of 16 instead of 8: no drops at all.
  assert float(stats['dropped_fraction']) <= float(half['dropped_fraction'])
  np.testing.assert_allclose(stats['moe_aux_loss'], half['moe_aux_loss'], rtol=1e-6)
  np.testing.assert_allclose(stats['router_z_loss'], half['router_z_loss'], rtol=1e-6)


def test_dense_models_report_zero_routing_losses():
  dense = dataclasses.replace(
    CFG, num_experts=0, experts_per_token=2, moe_d_ff=0, router_renormalize=True
  )
  weights = dict(moe_aux_loss=0.01, router_z_loss=0.001)
  (objective, (nll, _, stats)), _ = _GRAD(_params(dense), batch(), dense, **weights)
  assert all(float(v) == 0.0 for v in stats.values())
  assert float(objective) == float(nll)


@pytest.mark.parametrize(
  'fields',
  [dict(num_layers=5, moe_first_dense=1, moe_every=2, num_shared_experts=1)],
  ids=['dense-first-then-every-2nd-with-shared'],
)
def test_layer_patterns_scan_and_unroll_alike(fields):
  cfg = dataclasses.replace(CFG, **fields)
  assert len(cfg.sparse_layers()) == cfg.num_layers
  params, rows = _params(cfg), batch()
  unrolled = dataclasses.replace(cfg, scan_layers=False)
  flat = unstack_layers(params, cfg)
  assert sorted(k for k in flat if k.startswith('layers_')) == sorted(
    f'layers_{i}' for i in range(cfg.num_layers)
  )
  for i, sparse in enumerate(cfg.sparse_layers()):
    assert ('moe' in flat[f'layers_{i}']) == sparse
  scanned = _loss_and_grads(cfg, params, rows, moe_aux_loss=0.01)
  loop = _loss_and_grads(unrolled, flat, rows, moe_aux_loss=0.01)
  np.testing.assert_allclose(scanned[0], loop[0], rtol=1e-6)
  _assert_trees_close(scanned[2], stack_layers(loop[2], cfg), atol=1e-6, rtol=1e-5)
  assert [g.name for g in block.groups(cfg)][-1] == 'layers'


def test_aux_loss_gradient_reaches_the_router():
  params, rows = _params(CFG), batch()
  _, _, with_aux = _loss_and_grads(CFG, params, rows, moe_aux_loss=1.0)
  _, _, without = _loss_and_grads(CFG, params, rows)
  diff = with_aux['layers']['moe']['router'] - without['layers']['moe']['router']
  assert float(jnp.abs(diff).max()) > 1e-4


def test_a_bounded_dropless_buffer_keeps_the_first_copies_and_counts_the_rest():
  """One chip's share under expert parallelism: 1 of 4 experts, a buffer of P / 4 rows."""
  cfg = dataclasses.replace(CFG, experts_per_token=1, expert_buffer_factor=1.0)
  p = _params(cfg)['layers']['moe']
  experts = tuple(p[name][0, :1] for name in ('wi', 'wg', 'wo'))  # Layer 0, expert 0.
  x_BTD = jax.random.normal(jax.random.key(1), (1, 8, cfg.d_model))
  chosen_BTR = jnp.array([[0, 2, 0, 0, 1, 0, 3, 0]])[..., None]  # 5 copies for expert 0.
  weights_BTR = jnp.linspace(0.5, 1.0, 8).reshape(1, 8, 1)
  out_BTD, dropped = moe._dropless_experts(cfg, x_BTD, chosen_BTR, weights_BTR, *experts, 0)
  assert float(dropped) == 3  # Room for ceil(8 / 4) = 2 rows: the first two copies.
  ref = {k: v[0, :1] for k, v in p.items() if k != 'router'}
  h = jax.nn.silu(x_BTD[0] @ ref['wg'][0]) * (x_BTD[0] @ ref['wi'][0])
  want = (h @ ref['wo'][0]) * weights_BTR[0]
  kept = np.array([1, 0, 1, 0, 0, 0, 0, 0], bool)[:, None]
  np.testing.assert_allclose(out_BTD[0], np.where(kept, want, 0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  'fields, message',
  [
    (dict(experts_per_token=5), 'experts_per_token=5 must be between 1 and model.num_experts=4'),
    (dict(capacity_factor=-1.0), 'capacity_factor=-1.0 must be 0'),
    (dict(num_experts=0), 'model.moe_d_ff=24 is a mixture-of-experts setting'),
    (dict(num_layers=3, moe_every=2), 'model.moe_every=2 must be positive and divide the 3'),
    (
      dict(expert_buffer_factor=0.5),
      'model.expert_buffer_factor=0.5 must be 0 (no bound) or at least 1',
    ),
    (dict(capacity_factor=1.0, expert_buffer_factor=2.0), 'bounds only the dropless path'),
  ],
)
def test_bad_moe_fields_are_one_sentence(fields, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    dataclasses.replace(CFG, **fields)
