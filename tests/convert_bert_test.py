"""BERT import/export, its WordPiece tokenizer and fill-mask, against golden fixtures.

tests/fixtures/hf/bert_tiny* were written by tests/make_hf_fixtures.py with
transformers: a tiny random BertForMaskedLM, its logits on a padded batch with
token types, and transformers' ids for strings with [MASK] in them.
"""

import dataclasses
import functools
import json
import os
import pickle
import shutil

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
import safetensors.numpy

from llm import fill_mask as fill_mask_lib
from llm import generate
from llm import model as model_lib
from llm.convert import hf, safetensors_io
from llm.data import tokenizer as data_tokenizer
from llm.io import models
from llm.model import ModelConfig, Transformer

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'hf')
BERT = os.path.join(FIXTURES, 'bert_tiny')

with open(os.path.join(FIXTURES, 'bert_tiny_cases.json')) as f:
  CASES = json.load(f)


@functools.cache
def _apply(cfg):
  return jax.jit(Transformer(cfg).apply)


def _logits(cfg, params, ids, mask=None, types=None):
  as32 = lambda x: None if x is None else np.asarray(x, np.int32)  # noqa: E731
  return np.asarray(
    _apply(cfg)(
      {'params': params}, as32(ids), segment_ids_BT=as32(mask), token_types_BT=as32(types)
    )
  )


@functools.cache
def _expected():
  e = np.load(os.path.join(FIXTURES, 'bert_tiny_expected.npz'))
  return {k: e[k] for k in e.files}


def _check_parity(cfg, params):
  """Our logits equal transformers' wherever attention_mask is 1 (padding outputs differ)."""
  e = _expected()
  got = _logits(cfg, params, e['input_ids'], e['attention_mask'], e['token_type_ids'])
  real = e['attention_mask'].astype(bool)
  np.testing.assert_allclose(got[real], e['logits'][real], atol=1e-5, rtol=0)


def _tensors(hf_dir):
  out = {}
  for path in safetensors_io.checkpoint_files(hf_dir):
    out.update((n, np.array(w)) for n, w in safetensors_io.iter_tensors(path))
  return out


def _random_params(cfg, seed=0):
  shapes = nn.unbox(model_lib.abstract_params(cfg))
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


def _copy(tmp_path, name='bert'):
  dst = tmp_path / name
  shutil.copytree(BERT, dst)
  return dst


def _edit_config(hf_dir, **changes):
  with open(hf_dir / 'config.json') as f:
    config = json.load(f)
  config.update(changes)
  with open(hf_dir / 'config.json', 'w') as f:
    json.dump(config, f)


def test_logits_match_transformers_with_padding_and_token_types():
  cfg, params = hf.load(BERT)
  assert (cfg.causal, cfg.norm_position, cfg.mlp, cfg.head, cfg.type_vocab_size) == (
    False,
    'post',
    'gelu_exact',
    'mlm',
    2,
  )
  assert cfg.norm_eps == 1e-12 and 'unembed' not in params
  e = _expected()
  assert (e['token_type_ids'] == 1).any() and (e['attention_mask'] == 0).any()
  _check_parity(cfg, params)


def test_unrolled_layout_matches_too():
  cfg, params = hf.load(BERT, scan_layers=False)
  assert 'layers_1' in params
  _check_parity(cfg, params)


def test_tokenizer_ids_match_transformers():
  tok = hf.load_tokenizer(BERT)
  for i, text in enumerate(CASES['strings']):
    assert tok.encode(text) == CASES['ids'][i], repr(text)
    assert tok.encode(text, add_special_tokens=True) == CASES['ids_with_special'][i], repr(text)
    assert tok.decode(CASES['ids'][i]) == CASES['decoded'][i], repr(text)
    got = tok.decode(CASES['ids'][i], skip_special_tokens=False)
    assert got == CASES['decoded_with_special'][i], repr(text)


def test_bert_special_ids():
  tok = hf.load_tokenizer(BERT)
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
  # The pipeline frames documents with bos/eos: for BERT those are [CLS] and [SEP].
  assert (tok.bos_id, tok.eos_id) == (tok.cls_id, tok.sep_id)
  assert tok.special_ids == (0, 1, 2, 3, 4)
  ids = tok.encode('Hello, my dog is [MASK].', add_special_tokens=True)
  assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id and ids[-3] == tok.mask_id
  np.testing.assert_array_equal(ids, _expected()['input_ids'][0][: len(ids)])
  assert tok.id_to_token(tok.mask_id) == '[MASK]'
  # Tokenizers without [MASK] say so with None; their bos/eos are untouched.
  gpt2 = hf.load_tokenizer(os.path.join(FIXTURES, 'gpt2'))
  assert (gpt2.mask_id, gpt2.cls_id, gpt2.bos_id) == (None, None, 0)


def test_vocab_txt_only_directory(tmp_path):
  for name in ('vocab.txt', 'tokenizer_config.json'):
    shutil.copy(os.path.join(BERT, name), tmp_path)
  tok = hf.load_tokenizer(str(tmp_path))
  assert [tok.encode(s, add_special_tokens=True) for s in CASES['strings']] == CASES[
    'ids_with_special'
  ]
  assert tok.mask_id == 4
  again = pickle.loads(pickle.dumps(tok))  # grain workers
  assert again.encode('hello [MASK]') == tok.encode('hello [MASK]')


def test_special_tokens_default_to_bert_tokenizers(tmp_path):
  """bert-base-uncased's tokenizer_config.json names no special tokens; BertTokenizer's
  defaults ([CLS], [SEP], [MASK], ...) apply, as in transformers."""
  shutil.copy(os.path.join(BERT, 'tokenizer.json'), tmp_path)
  (tmp_path / 'tokenizer_config.json').write_text('{"do_lower_case": true}')
  tok = hf.load_tokenizer(str(tmp_path))
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id) == (2, 3, 0, 4)
  os.remove(tmp_path / 'tokenizer.json')
  shutil.copy(os.path.join(BERT, 'vocab.txt'), tmp_path)
  tok = hf.load_tokenizer(str(tmp_path))
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id) == (2, 3, 0, 4)


def test_data_tokenizer_accepts_a_hugging_face_directory(tmp_path):
  tok = data_tokenizer.load(ml_collections.ConfigDict({'tokenizer': BERT}))
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id) == (145, 2, 3, 0, 4)
  np.testing.assert_array_equal(tok.encode_array('my dog'), CASES['ids'][0][2:4])
  # An import output keeps the tokenizer in tokenizer/.
  shutil.copytree(BERT, tmp_path / 'imported' / 'tokenizer')
  tok = data_tokenizer.load(ml_collections.ConfigDict({'tokenizer': str(tmp_path / 'imported')}))
  assert tok.mask_id == 4
  # A tokenizer without BOS (nor [CLS]) cannot frame documents.
  (tmp_path / 'no_bos').mkdir()
  shutil.copy(os.path.join(FIXTURES, 'gpt2', 'tokenizer.json'), tmp_path / 'no_bos')
  with pytest.raises(ValueError, match='no BOS and no EOS token'):
    data_tokenizer.load(ml_collections.ConfigDict({'tokenizer': str(tmp_path / 'no_bos')}))


def test_hf_ours_hf_gives_identical_tensors(tmp_path):
  cfg, params = hf.load(BERT)
  hf.save(cfg, params, str(tmp_path), tokenizer=BERT)
  before, after = _tensors(BERT), _tensors(str(tmp_path))
  assert sorted(before) == sorted(after)
  for n, w in before.items():
    np.testing.assert_array_equal(after[n], w, err_msg=n)
  cfg2, _ = hf.load(str(tmp_path))
  assert cfg2 == cfg
  with open(tmp_path / 'config.json') as f:
    config = json.load(f)
  assert config['architectures'] == ['BertForMaskedLM'] and config['pad_token_id'] == 0
  assert 'bos_token_id' not in config  # BERT has none; [CLS] is not written as one.
  assert hf.load_tokenizer(str(tmp_path)).mask_id == 4


_OURS = {
  # No token types (exported as one zero row), untied decoder, tanh GELU, unrolled.
  'untied_no_types': ModelConfig(
    vocab_size=40,
    d_model=16,
    num_heads=2,
    num_kv_heads=2,
    d_ff=24,
    max_seq_len=16,
    norm='layernorm',
    mlp='gelu',
    position='learned',
    use_bias=True,
    causal=False,
    norm_position='post',
    head='mlm',
    scan_layers=False,
  ),
  # No attention/MLP biases: exported as zeros, while the MLM head keeps its bias.
  'tied_no_bias': ModelConfig(
    vocab_size=40,
    d_model=16,
    num_heads=2,
    num_kv_heads=2,
    d_ff=24,
    max_seq_len=16,
    norm='layernorm',
    mlp='gelu_exact',
    position='learned',
    tie_embeddings=True,
    causal=False,
    norm_position='post',
    type_vocab_size=2,
    head='mlm',
  ),
}


@pytest.mark.parametrize('name', sorted(_OURS))
def test_ours_hf_ours_round_trip(name, tmp_path):
  cfg = _OURS[name]
  params = _random_params(cfg)
  hf.save(cfg, params, str(tmp_path))
  cfg2, params2 = hf.load(str(tmp_path), scan_layers=cfg.scan_layers)
  rng = np.random.RandomState(1)
  ids, mask = rng.randint(0, cfg.vocab_size, (2, 8)), np.ones((2, 8), np.int32)
  mask[0, 5:] = 0
  types = rng.randint(0, 2, (2, 8)) if cfg.type_vocab_size else None
  want = _logits(cfg, params, ids, mask, types)
  got = _logits(cfg2, params2, ids, mask, types if cfg2.type_vocab_size == 2 else None)
  np.testing.assert_allclose(got[mask == 1], want[mask == 1], atol=1e-5, rtol=0)
  assert cfg2 == dataclasses.replace(
    cfg, use_bias=True, type_vocab_size=max(cfg.type_vocab_size, 1)
  )


def _rewrite(hf_dir, rename=lambda n: n, extra=None, drop=()):
  tensors = {rename(n): w for n, w in _tensors(str(hf_dir)).items() if n not in drop}
  tensors.update(extra or {})
  os.remove(hf_dir / 'model.safetensors')
  safetensors.numpy.save_file(tensors, str(hf_dir / 'model.safetensors'), metadata={'format': 'pt'})


def test_pretraining_checkpoint_with_legacy_names(tmp_path):
  """The layout of Google's releases (bert-base-uncased): LayerNorm gamma/beta, the pooler,
  the next-sentence head and the tied decoder weight saved again; the extras are dropped."""
  d = _copy(tmp_path)
  _edit_config(d, architectures=['BertForPreTraining'])
  tensors = _tensors(BERT)
  D = tensors['bert.embeddings.word_embeddings.weight'].shape[1]
  extra = {
    'bert.pooler.dense.weight': np.ones((D, D), np.float32),
    'bert.pooler.dense.bias': np.ones((D,), np.float32),
    'cls.seq_relationship.weight': np.ones((2, D), np.float32),
    'cls.seq_relationship.bias': np.ones((2,), np.float32),
    'cls.predictions.decoder.weight': tensors['bert.embeddings.word_embeddings.weight'],
    'cls.predictions.decoder.bias': tensors['cls.predictions.bias'],
    'bert.embeddings.position_ids': np.arange(32, dtype=np.int64)[None],
  }
  legacy = {'LayerNorm.weight': 'LayerNorm.gamma', 'LayerNorm.bias': 'LayerNorm.beta'}

  def rename(n):
    for new, old in legacy.items():
      n = n.replace(new, old)
    return n

  _rewrite(d, rename, extra)
  cfg, params = hf.load(str(d))
  _check_parity(cfg, params)


def test_bert_model_without_mlm_head_is_refused(tmp_path):
  d = _copy(tmp_path)
  _edit_config(d, architectures=['BertModel'])
  with pytest.raises(ValueError, match='BertModel, which has no masked-LM head'):
    hf.load(str(d))
  # Without the architecture to tell, the missing head is named tensor by tensor.
  _edit_config(d, architectures=['BertForMaskedLM'])
  _rewrite(
    d,
    rename=lambda n: n.removeprefix('bert.'),
    drop=[n for n in _tensors(BERT) if n.startswith('cls.')],
  )
  with pytest.raises(ValueError, match=r'lacks tensors.*cls\.predictions\.bias'):
    hf.load(str(d))


@pytest.mark.parametrize(
  'changes, match',
  [
    (dict(hidden_act='relu'), "hidden_act='relu' is not supported"),
    (dict(position_embedding_type='relative_key'), "position_embedding_type='relative_key'"),
    (dict(is_decoder=True), 'is_decoder=True'),
  ],
)
def test_unsupported_bert_variants_are_refused(changes, match, tmp_path):
  d = _copy(tmp_path)
  _edit_config(d, **changes)
  with pytest.raises(ValueError, match=match):
    hf.load(str(d))


def test_gelu_new_is_the_tanh_gelu(tmp_path):
  d = _copy(tmp_path)
  _edit_config(d, hidden_act='gelu_new')
  cfg, _ = hf.load(str(d))
  assert cfg.mlp == 'gelu'


def test_export_refuses_heads_other_families_cannot_hold(tmp_path):
  cfg = dataclasses.replace(_OURS['tied_no_bias'], causal=True, norm_position='pre')
  with pytest.raises(ValueError, match=r"GPT2LMHeadModel it has .*model.head='mlm'"):
    hf.save(cfg, _random_params(cfg), str(tmp_path / 'a'))


def test_fill_mask_top_prediction_is_transformers():
  cfg, params = hf.load(BERT)
  tok = hf.load_tokenizer(BERT)
  e = _expected()
  ids = e['input_ids'][0][e['attention_mask'][0] == 1]
  want_logits = e['logits'][0, int(np.flatnonzero(ids == tok.mask_id)[0])]
  (predictions,) = fill_mask_lib.fill_mask(cfg, params, tok, 'Hello, my dog is [MASK].', top_k=3)
  assert [p.token_id for p in predictions] == list(np.argsort(-want_logits)[:3])
  probs = np.exp(want_logits - want_logits.max())
  np.testing.assert_allclose(predictions[0].probability, probs.max() / probs.sum(), rtol=1e-4)
  assert predictions[0].token == tok.id_to_token(predictions[0].token_id)
  two = fill_mask_lib.fill_mask(cfg, params, tok, '[MASK] dog is [MASK].', top_k=2)
  assert len(two) == 2 and all(len(p) == 2 for p in two)


def test_fill_mask_loads_a_hugging_face_directory_and_an_import(tmp_path):
  from llm.convert import commands

  cfg, params, tok = models.load(BERT)
  want = fill_mask_lib.fill_mask(cfg, params, tok, 'my dog is [MASK]')
  commands.import_hf(BERT, str(tmp_path / 'imported'))
  cfg, params, tok = models.load(str(tmp_path / 'imported'))
  assert fill_mask_lib.fill_mask(cfg, params, tok, 'my dog is [MASK]') == want


def test_fill_mask_with_our_byte_tokenizer_uses_the_id_past_the_vocabulary():
  tok = data_tokenizer.ByteTokenizer()
  ids = fill_mask_lib.encode(tok, 'ab[MASK]c')
  assert ids == [tok.bos_id, 100, 101, tok.vocab_size, 102, tok.eos_id]
  cfg = dataclasses.replace(_OURS['tied_no_bias'], vocab_size=tok.vocab_size + 1, max_seq_len=32)
  (predictions,) = fill_mask_lib.fill_mask(cfg, _random_params(cfg), tok, 'ab[MASK]c', top_k=4)
  assert len(predictions) == 4
  assert sum(p.probability for p in predictions) <= 1 + 1e-6
  small = dataclasses.replace(cfg, vocab_size=tok.vocab_size)
  with pytest.raises(ValueError, match='mask id is 259.*outside the model vocabulary'):
    fill_mask_lib.fill_mask(small, _random_params(small), tok, 'ab[MASK]c')


def test_fill_mask_and_generate_refusals():
  cfg, params = hf.load(BERT)
  tok = hf.load_tokenizer(BERT)
  with pytest.raises(ValueError, match='has no \\[MASK\\]'):
    fill_mask_lib.fill_mask(cfg, params, tok, 'no mask here')
  lm = dataclasses.replace(cfg, head='lm', causal=True)
  with pytest.raises(ValueError, match="model.head='lm'.*needs a masked-LM model"):
    fill_mask_lib.fill_mask(lm, params, tok, 'a [MASK]')
  with pytest.raises(ValueError, match='not a left-to-right language model'):
    generate.generate_ids(cfg, params, [[2, 5]], max_new_tokens=2)
