"""Live parity against transformers, for shapes the golden fixtures do not cover.

Skipped unless torch and transformers are importable (they are never runtime
dependencies); to run it, install them next to the project's requirements:

  pip install torch==2.13.0 transformers
  pytest tests/convert_live_test.py

Each case builds a fresh random model with transformers and checks that
HF -> ours gives the same logits, HF -> ours -> HF gives identical tensors,
and ours -> HF (`from_pretrained`) gives the same logits.
"""

import functools
import os

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from llm import model as model_lib  # noqa: E402
from llm.convert import commands, hf, safetensors_io  # noqa: E402
from llm.model import ModelConfig, Transformer  # noqa: E402
from tests import make_hf_fixtures as fx  # noqa: E402

V = 96

HF_CASES = {
  'gpt2_untied_wide': lambda: fx.gpt2_config(
    V,
    n_embd=48,
    n_head=6,
    n_layer=3,
    n_inner=96,
    n_positions=24,
    layer_norm_epsilon=1e-6,
    tie_word_embeddings=False,
  ),
  'llama_tied_mqa': lambda: fx.llama_config(
    V,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=1,
    head_dim=None,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    rope_parameters=dict(rope_type='default', rope_theta=500000.0),
  ),
  'llama_attention_bias_linear_rope': lambda: fx.llama_config(
    V,
    attention_bias=True,
    rope_parameters=dict(rope_type='linear', rope_theta=10000.0, factor=2.0),
  ),
  'mixtral_tied_mqa_top1': lambda: fx.mixtral_config(
    V,
    num_hidden_layers=3,
    num_key_value_heads=1,
    head_dim=None,
    num_local_experts=3,
    num_experts_per_tok=1,
    tie_word_embeddings=True,
  ),
  'qwen3_moe_step2_renormalised_bias_linear_rope': lambda: fx.qwen3_moe_config(
    V,
    num_hidden_layers=4,
    mlp_only_layers=[],
    decoder_sparse_step=2,
    norm_topk_prob=True,
    attention_bias=True,
    tie_word_embeddings=True,
    rope_parameters=dict(rope_type='linear', rope_theta=10000.0, factor=2.0),
  ),
}


@functools.cache
def _apply(cfg):
  return jax.jit(Transformer(cfg).apply)


def _ours(cfg, params, ids):
  return np.asarray(_apply(cfg)({'params': params}, np.asarray(ids, np.int32)))


def _theirs(hf_dir, ids):
  model = transformers.AutoModelForCausalLM.from_pretrained(
    hf_dir, dtype=torch.float32, attn_implementation='eager'
  )
  return fx.logits(model.eval(), np.asarray(ids, np.int64))


def _tensors(hf_dir):
  out = {}
  for path in safetensors_io.checkpoint_files(hf_dir):
    out.update((n, np.array(w)) for n, w in safetensors_io.iter_tensors(path))
  return out


@pytest.mark.parametrize('name', sorted(HF_CASES))
def test_hf_to_ours_to_hf(name, tmp_path):
  src, out = str(tmp_path / 'src'), str(tmp_path / 'out')
  model = fx.build_model(src, HF_CASES[name](), seed=7)
  ids = fx.input_ids(V, seed=8, shape=(2, 12))
  cfg, params = hf.load(src)
  ours = _ours(cfg, params, ids)
  np.testing.assert_allclose(ours, fx.logits(model, ids), atol=1e-4, rtol=0)

  hf.save(cfg, params, out)
  before, after = _tensors(src), _tensors(out)
  assert sorted(before) == sorted(after)
  for n, w in before.items():
    np.testing.assert_array_equal(after[n], w, err_msg=n)
  np.testing.assert_allclose(_theirs(out, ids), ours, atol=1e-4, rtol=0)


OUR_CASES = {
  'llama_gqa_llama3_rope_mlp_bias': ModelConfig(
    vocab_size=V,
    num_layers=2,
    d_model=32,
    num_heads=4,
    num_kv_heads=2,
    head_dim=12,
    d_ff=48,
    use_bias=True,
    rope_scaling='llama3',
    rope_scaling_factor=8.0,
    rope_original_max_seq_len=32,
  ),
  'mixtral_wide_experts': ModelConfig(
    vocab_size=V,
    num_layers=2,
    d_model=32,
    num_heads=4,
    num_kv_heads=2,
    head_dim=12,
    d_ff=64,
    moe_d_ff=24,
    num_experts=4,
    experts_per_token=2,
  ),
  'qwen3_moe_first_dense_every_2': ModelConfig(
    vocab_size=V,
    num_layers=5,
    d_model=32,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    d_ff=48,
    qk_norm=True,
    num_experts=4,
    experts_per_token=2,
    moe_d_ff=24,
    moe_first_dense=1,
    moe_every=2,
    router_renormalize=False,
    rope_scaling='llama3',
    rope_scaling_factor=8.0,
    rope_original_max_seq_len=32,
  ),
  'gpt2_tied': ModelConfig(
    vocab_size=V,
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
  ),
}


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('name', sorted(OUR_CASES))
def test_ours_to_transformers(name, dtype, tmp_path):
  cfg = OUR_CASES[name]
  shapes = nn.unbox(model_lib.abstract_params(cfg))
  rng = np.random.RandomState(0)
  params = jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
  hf.save(cfg, params, str(tmp_path), dtype=dtype)
  if dtype == 'bfloat16':
    params = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), params)
  ids = fx.input_ids(V, seed=3, shape=(2, 12))
  np.testing.assert_allclose(_theirs(str(tmp_path), ids), _ours(cfg, params, ids), atol=1e-4)


BERT_CASES = {
  'bert_wide_tanh_gelu': lambda: fx.bert_config(
    V,
    hidden_size=48,
    num_attention_heads=6,
    num_hidden_layers=3,
    intermediate_size=80,
    hidden_act='gelu_new',
    layer_norm_eps=1e-6,
  ),
  'bert_untied_one_type': lambda: fx.bert_config(V, type_vocab_size=1, tie_word_embeddings=False),
}


@pytest.mark.parametrize('name', sorted(BERT_CASES))
def test_bert_hf_to_ours_to_hf(name, tmp_path):
  """BertForMaskedLM with padding: the same logits both ways and identical tensors."""
  src, out = str(tmp_path / 'src'), str(tmp_path / 'out')
  config = BERT_CASES[name]()
  model = fx.build_model(src, config, seed=9, auto=transformers.AutoModelForMaskedLM)
  rng = np.random.RandomState(10)
  batch = dict(
    input_ids=rng.randint(0, V, (2, 12)),
    attention_mask=np.ones((2, 12), np.int64),
    token_type_ids=rng.randint(0, config.type_vocab_size, (2, 12)),
  )
  batch['attention_mask'][1, 7:] = 0
  real = batch['attention_mask'] == 1
  cfg, params = hf.load(src)
  ours = np.asarray(
    _apply(cfg)(
      {'params': params},
      batch['input_ids'].astype(np.int32),
      segment_ids_BT=batch['attention_mask'].astype(np.int32),
      token_types_BT=batch['token_type_ids'].astype(np.int32),
    )
  )
  np.testing.assert_allclose(ours[real], fx.bert_logits(model, batch)[real], atol=1e-4, rtol=0)

  hf.save(cfg, params, out)
  before, after = _tensors(src), _tensors(out)
  assert sorted(before) == sorted(after)
  for n, w in before.items():
    # Untied, transformers 5 computes with the decoder's bias and leaves this one unused;
    # export writes the decoder's under both names.
    if n == 'cls.predictions.bias' and not config.tie_word_embeddings:
      w = before['cls.predictions.decoder.bias']
    np.testing.assert_array_equal(after[n], w, err_msg=n)
  theirs = transformers.AutoModelForMaskedLM.from_pretrained(
    out, dtype=torch.float32, attn_implementation='eager'
  )
  np.testing.assert_allclose(fx.bert_logits(theirs.eval(), batch)[real], ours[real], atol=1e-4)


def test_tokenizers_survive_import_and_export(tmp_path):
  """HF dir -> params checkpoint -> HF dir: transformers reads the same ids as ours."""
  for kind, train in (('bpe', fx.train_byte_bpe), ('sp', fx.train_sentencepiece)):
    src, ckpt, out = (str(tmp_path / f'{kind}_{d}') for d in ('src', 'ckpt', 'out'))
    train(src)
    tok = hf.load_tokenizer(src)
    config = fx.gpt2_config(tok.vocab_size) if kind == 'bpe' else fx.llama_config(tok.vocab_size)
    fx.build_model(src, config, seed=1)
    commands.import_hf(src, ckpt)
    commands.export_hf(ckpt, out)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    ours = hf.load_tokenizer(out)
    reference = transformers.AutoTokenizer.from_pretrained(src)
    for text in fx.AWKWARD_STRINGS:
      want = reference.encode(text, add_special_tokens=False)
      assert theirs.encode(text, add_special_tokens=False) == want, (kind, text)
      if kind == 'bpe':
        assert ours.encode(text) == want, text
    assert os.path.exists(os.path.join(out, 'config.json'))


@pytest.mark.parametrize('name', ['mixtral', 'qwen3_moe'])
def test_moe_through_the_convert_commands(name, tmp_path):
  """HF dir -> `llm.convert import` (a params export) -> `export`: transformers' logits."""
  src, ckpt, out = (str(tmp_path / d) for d in ('src', 'ckpt', 'out'))
  config = fx.mixtral_config(V) if name == 'mixtral' else fx.qwen3_moe_config(V)
  model = fx.build_model(src, config, seed=12)
  commands.import_hf(src, ckpt, scan_layers=name == 'mixtral')
  commands.export_hf(ckpt, out)
  ids = fx.input_ids(V, seed=13, shape=(2, 12))
  np.testing.assert_allclose(_theirs(out, ids), fx.logits(model, ids), atol=1e-4, rtol=0)
