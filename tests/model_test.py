"""Model: published parameter counts, causality, documents, scan and remat equivalence."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import presets
from llm import model as model_lib
from llm.model import ModelConfig, Transformer

GPT = ModelConfig(
  vocab_size=97,
  num_layers=2,
  d_model=32,
  num_heads=4,
  num_kv_heads=4,
  d_ff=64,
  max_seq_len=16,
  norm='layernorm',
  mlp='gelu',
  position='learned',
  use_bias=True,
  tie_embeddings=True,
)
LLAMA = ModelConfig(vocab_size=97, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, d_ff=64)


def _init(cfg, T=12, B=2):
  tokens = jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size)
  params = nn.unbox(Transformer(cfg).init(jax.random.key(0), tokens)['params'])
  return params, tokens


def test_gpt2_124m_parameter_count():
  assert model_lib.count_params(ModelConfig(**presets.GPT2_124M)) == 124_439_808


def test_llama2_7b_parameter_count():
  assert model_lib.count_params(ModelConfig(**presets.LLAMA2_7B)) == 6_738_415_616


@pytest.mark.parametrize('preset, count', [('bert_base', 109_514_298), ('bert_large', 335_174_458)])
def test_bert_parameter_counts_match_hugging_face_bert_for_masked_lm(preset, count):
  # Counted on transformers' BertForMaskedLM(BertConfig(...)): no pooler, decoder tied.
  assert model_lib.count_params(ModelConfig(**presets.get(preset))) == count


@pytest.mark.parametrize('cfg', [GPT, LLAMA], ids=['gpt', 'llama'])
def test_changing_a_token_changes_no_earlier_logit(cfg):
  params, tokens = _init(cfg)
  t = 7
  changed = tokens.at[:, t].set((tokens[:, t] + 1) % cfg.vocab_size)
  before = Transformer(cfg).apply({'params': params}, tokens)
  after = Transformer(cfg).apply({'params': params}, changed)
  np.testing.assert_array_equal(before[:, :t], after[:, :t])
  assert np.abs(before[:, t:] - after[:, t:]).max() > 1e-4


@pytest.mark.parametrize('cfg', [GPT, LLAMA], ids=['gpt', 'llama'])
def test_packed_documents_do_not_see_each_other(cfg):
  params, tokens = _init(cfg, T=12, B=1)
  segments = jnp.array([[1] * 5 + [2] * 7])
  positions = jnp.array([list(range(5)) + list(range(7))])
  out = Transformer(cfg).apply({'params': params}, tokens, positions, segments)
  # The second document alone, at the same positions, gives the same logits.
  alone = Transformer(cfg).apply({'params': params}, tokens[:, 5:])
  np.testing.assert_allclose(out[:, 5:], alone, atol=1e-5)
  # Changing the first document does not change the second one.
  changed = tokens.at[:, 2].set((tokens[:, 2] + 3) % cfg.vocab_size)
  out2 = Transformer(cfg).apply({'params': params}, changed, positions, segments)
  np.testing.assert_array_equal(out[:, 5:], out2[:, 5:])


def _loss_and_grads(cfg, params, tokens):
  def loss(p):
    logits = Transformer(cfg).apply({'params': p}, tokens)
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize('cfg', [GPT, LLAMA], ids=['gpt', 'llama'])
def test_scan_and_unrolled_layers_agree(cfg):
  params, tokens = _init(cfg)
  unrolled = dataclasses.replace(cfg, scan_layers=False)
  loss_s, grads_s = _loss_and_grads(cfg, params, tokens)
  loss_u, grads_u = _loss_and_grads(unrolled, model_lib.unstack_layers(params, cfg), tokens)
  np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
  grads_u = model_lib.stack_layers(grads_u, cfg)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grads_s, grads_u
  )


@pytest.mark.parametrize('scan', [True, False], ids=['scan', 'unrolled'])
@pytest.mark.parametrize('remat', ['full', 'dots_saveable', 'minimal'])
def test_remat_policies_do_not_change_loss_or_gradients(remat, scan):
  base = dataclasses.replace(LLAMA, scan_layers=scan)
  params, tokens = _init(base)
  loss0, grads0 = _loss_and_grads(base, params, tokens)
  loss1, grads1 = _loss_and_grads(dataclasses.replace(base, remat=remat), params, tokens)
  np.testing.assert_allclose(loss0, loss1, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grads0, grads1)


def test_grouped_query_attention_equals_repeated_kv_heads():
  """GQA with K kv heads is MHA whose k/v weights repeat each kv head N/K times."""
  params, tokens = _init(LLAMA)
  mha = dataclasses.replace(LLAMA, num_kv_heads=LLAMA.num_heads)
  groups = LLAMA.num_heads // LLAMA.num_kv_heads
  mha_params = jax.tree.map(lambda x: x, params)
  for name in ('k', 'v'):
    mha_params['layers']['attn'][name] = jnp.repeat(params['layers']['attn'][name], groups, axis=2)
  np.testing.assert_allclose(
    Transformer(LLAMA).apply({'params': params}, tokens),
    Transformer(mha).apply({'params': mha_params}, tokens),
    atol=1e-5,
  )


def test_bfloat16_compute_keeps_float32_params_and_logits():
  cfg = dataclasses.replace(LLAMA, dtype='bfloat16')
  params, tokens = _init(cfg)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  logits = Transformer(cfg).apply({'params': params}, tokens)
  assert logits.dtype == jnp.float32
  ref = Transformer(LLAMA).apply({'params': params}, tokens)
  np.testing.assert_allclose(logits, ref, atol=0.05)


@pytest.mark.parametrize(
  'fields, message',
  [
    (dict(num_heads=4, num_kv_heads=3), 'num_kv_heads=3 must divide model.num_heads=4'),
    (dict(norm='batchnorm'), "model.norm='batchnorm' is not one of layernorm, rmsnorm"),
    (dict(remat='some'), "model.remat='some'"),
    (dict(d_model=30, num_heads=4), 'd_model=30 is not divisible by model.num_heads=4'),
  ],
)
def test_bad_model_configs_stop_with_a_clear_sentence(fields, message):
  with pytest.raises(ValueError, match=message):
    ModelConfig(**fields)


def test_unknown_model_key_is_named():
  with pytest.raises(ValueError, match=r"Unknown model config keys \['num_layer'\]"):
    ModelConfig.from_dict({'num_layer': 2})


@pytest.mark.parametrize(
  'preset, count', [('gpt2_124m', 124_439_808), ('llama2_7b', 6_738_415_616)]
)
def test_experiment_configs_keep_the_presets_shapes(preset, count):
  """A preset through an experiment config keeps its head_dim (d_model // num_heads)."""
  from experiments import synthetic

  cfg = ModelConfig.from_dict(synthetic.get_config(preset).model)
  assert model_lib.count_params(cfg) == count
