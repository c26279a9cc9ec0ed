"""The chunked cross-entropy equals the whole-logits one, on one device and on a mesh.

`losses.CHUNK` is far larger than these models' T, so each test passes a small
`chunk` (one that divides T and one that does not) and compares it with
`chunk=T`, which takes the [B, T, V] logits whole.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm import losses, sharding
from llm.model import ModelConfig, Transformer, param_shardings

B, T = 4, 20
# One unrolled layer: the loss is about the head, and compiles stay short.
LLAMA = ModelConfig(
  vocab_size=96,
  num_layers=1,
  d_model=32,
  num_heads=4,
  num_kv_heads=2,
  d_ff=64,
  max_seq_len=T,
  scan_layers=False,
)
GPT = dataclasses.replace(
  LLAMA, norm='layernorm', mlp='gelu', position='learned', use_bias=True, tie_embeddings=True
)
BERT = dataclasses.replace(
  GPT, causal=False, norm_position='post', type_vocab_size=2, mlp='gelu_exact', head='mlm'
)
CONFIGS = {'untied_lm': LLAMA, 'tied_lm': GPT, 'mlm': BERT}
Z_LOSS = 0.1  # Large enough that the z-loss moves every gradient visibly.


@functools.cache
def _batch(name: str) -> dict:
  """Rows of two packed documents and padding (segment id 0), some loss positions masked."""
  cfg, rng = CONFIGS[name], np.random.default_rng(1)
  segment_ids = np.array([1] * 9 + [2] * 7 + [0] * 4, np.int32)
  positions = np.concatenate([np.arange(9), np.arange(7), np.zeros(4)]).astype(np.int32)
  batch = {
    'inputs': rng.integers(0, cfg.vocab_size, (B, T), np.int32),
    'targets': rng.integers(0, cfg.vocab_size, (B, T), np.int32),
    'segment_ids': np.broadcast_to(segment_ids, (B, T)),
    'positions': np.broadcast_to(positions, (B, T)),
    'loss_mask': ((segment_ids > 0) & (rng.random((B, T)) < 0.8)).astype(np.float32),
  }
  if cfg.type_vocab_size:
    batch['token_types'] = rng.integers(0, 2, (B, T), np.int32)
  return batch


@functools.cache
def _params(name: str):
  cfg = CONFIGS[name]
  params = jax.jit(Transformer(cfg).init)(jax.random.key(0), np.zeros((B, T), np.int32))
  params = nn.unbox(params['params'])
  if 'unembed_bias' in params:  # Nonzero, so that a dropped bias would show.
    params['unembed_bias'] = jax.random.normal(jax.random.key(2), params['unembed_bias'].shape)
  return params


def _train(cfg, chunk):
  fn = jax.value_and_grad(losses.train_sums, has_aux=True)
  return jax.jit(lambda p, b: fn(p, b, cfg, Z_LOSS, chunk))


def _eval(cfg, chunk):
  return jax.jit(lambda p, b, bytes_V: losses.eval_sums(p, b, bytes_V, cfg=cfg, chunk=chunk))


def _bytes_V(cfg):
  return np.random.default_rng(3).integers(1, 5, (cfg.vocab_size,), np.int32)


@functools.cache
def _whole(name: str):
  """(train_sums' value and gradients, eval_sums) from the whole [B, T, V] logits."""
  cfg, params, batch = CONFIGS[name], _params(name), _batch(name)
  train = _train(cfg, T)(params, batch)
  return jax.device_get((train, _eval(cfg, T)(params, batch, _bytes_V(cfg))))


def _assert_close(got, want):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)


@pytest.mark.parametrize(
  'name, chunk',
  [('untied_lm', 5), ('untied_lm', 8), ('tied_lm', 8), ('mlm', 8)],
  ids=['untied_lm-divides', 'untied_lm-padded', 'tied_lm-padded', 'mlm-padded'],
)
def test_chunked_loss_and_gradients_equal_the_whole_logits(name, chunk):
  cfg, params, batch = CONFIGS[name], _params(name), _batch(name)
  (objective, (nll, tokens, _)), grads = _train(cfg, chunk)(params, batch)
  ((objective_1, (nll_1, tokens_1, _)), grads_1), _ = _whole(name)
  assert float(tokens) == float(tokens_1) == float(batch['loss_mask'].sum())
  assert float(objective - nll) > 1e-2 * float(nll)  # The z-loss term is there.
  _assert_close((objective, nll), (objective_1, nll_1))
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  _assert_close(grads, grads_1)


@pytest.mark.parametrize('name', CONFIGS)
def test_chunked_eval_sums_equal_the_whole_logits(name):
  cfg, params, batch = CONFIGS[name], _params(name), _batch(name)
  got = _eval(cfg, 8)(params, batch, _bytes_V(cfg))
  _, want = _whole(name)
  assert sorted(got) == ['bytes', 'correct', 'nll_sum', 'tokens']
  for key in ('tokens', 'bytes', 'correct'):
    assert float(got[key]) == float(want[key]), key
  np.testing.assert_allclose(got['nll_sum'], want['nll_sum'], rtol=1e-5)


def test_the_chunked_gradient_never_holds_the_whole_logits():
  params, batch = _params('untied_lm'), _batch('untied_lm')
  whole = f'[{B},{T},{LLAMA.vocab_size}]'
  assert whole in str(jax.make_jaxpr(_train(LLAMA, T))(params, batch))
  assert whole not in str(jax.make_jaxpr(_train(LLAMA, 8))(params, batch))


@pytest.mark.parametrize('name', ['untied_lm', 'mlm'])
def test_chunked_loss_on_an_fsdp_tensor_mesh_equals_one_device(name):
  cfg, params, batch = CONFIGS[name], _params(name), _batch(name)
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 4, 'tensor': 2})
  with sharding.rules_context(mesh):
    params = jax.device_put(params, param_shardings(cfg, mesh))
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    train = _train(cfg, 8).lower(params, batch).compile()
    (_, (nll, _, _)), grads = train(params, batch)
    got_eval = _eval(cfg, 8)(
      params, batch, jax.device_put(_bytes_V(cfg), sharding.replicated(mesh))
    )
  ((_, (nll_1, _, _)), grads_1), eval_1 = _whole(name)
  _assert_close((nll, grads), (nll_1, grads_1))
  _assert_close(got_eval, eval_1)
  # The projection stays split by vocabulary over `tensor`: no device ever holds
  # the whole [V, D] table or its gradient (HLO shapes are per device).
  hlo, V, D = train.as_text(), cfg.vocab_size, cfg.d_model
  assert f'f32[{V},{D}]' not in hlo and f'f32[{D},{V}]' not in hlo
  assert f'[{V // 2},{D}]' in hlo or f'[{D},{V // 2}]' in hlo


def test_hidden_states_are_refused_with_a_cache_or_a_classifier():
  classifier = dataclasses.replace(LLAMA, head='classifier', num_labels=3)
  tokens = jnp.zeros((B, T), jnp.int32)
  with pytest.raises(ValueError, match='hidden=True'):
    Transformer(classifier).init(jax.random.key(0), tokens, hidden=True)
