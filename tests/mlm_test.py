"""Masked language modelling: the 80/10/10 masking, the pipeline's MLM rows, the BERT encoder."""

import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments import presets
from llm import config as config_lib
from llm import train
from llm.data import mlm, pipeline, streams, tokenizer
from llm.eval import lm
from llm.model import ModelConfig, Transformer


def _iterator(data, *, vocab_size=None, **stream):
  """`stream`'s batches through the one dispatch training and evaluation use."""
  model_cfg = None if vocab_size is None else ModelConfig(vocab_size=vocab_size)
  return streams.make_iterator(streams.Stream(data, **stream), model_cfg)


TOK = tokenizer.ByteTokenizer()
DOCS = [f'doc {i}: ' + 'the quick brown fox jumps '[i % 7 :] * (i % 5 + 1) for i in range(60)]
SOURCE = [{'text': d.encode()} for d in DOCS]
# BERT's layout at a toy size; vocab 260 = the byte tokenizer's 259 ids + [MASK].
BERT = ModelConfig(
  **dict(
    presets.BERT_BASE,
    vocab_size=260,
    num_layers=2,
    d_model=32,
    num_heads=4,
    num_kv_heads=4,
    d_ff=64,
    max_seq_len=32,
  )
)


def mlm_data(**overrides) -> ml_collections.ConfigDict:
  c = config_lib.data_config()
  c.update({'objective': 'mlm', 'dataset': 'text_files', **overrides})
  return c


SETTINGS = mlm.settings(mlm_data(), TOK)


def make(seed=0, num_epochs=None, masking=SETTINGS, rows=4, seq_len=32):
  dataset = pipeline.build(
    SOURCE,
    TOK,
    stream=streams.Stream(
      None,
      'train',
      batch_size=rows,
      seq_len=seq_len,
      seed=seed,
      shuffle=True,
      num_epochs=num_epochs,
      process_index=0,
      process_count=1,
    ),
    field='text',
    masking=masking,
  )
  return pipeline.Iterator(dataset, {'seed': seed})


def test_settings_of_the_byte_tokenizer():
  assert SETTINGS.mask_id == TOK.vocab_size == 259
  assert SETTINGS.special_ids.tolist() == [0, 1, 2, 259]
  assert SETTINGS.regular_ids.tolist() == list(range(3, 259))


def test_a_tokenizers_own_mask_id_and_special_ids_are_used():
  class WordPiece:  # The attributes an imported BERT tokenizer has.
    vocab_size, pad_id, bos_id, eos_id, unk_id, mask_id = 40, 0, 11, 12, 10, 13
    special_ids = (0, 10, 11, 12, 13)

  s = mlm.settings(mlm_data(), WordPiece())
  assert s.mask_id == 13
  assert s.special_ids.tolist() == [0, 10, 11, 12, 13]
  assert len(s.regular_ids) == 35 and 13 not in s.regular_ids
  mlm.check_vocab(40, s)  # The mask id is inside the tokenizer: no extra row needed.


def test_masking_statistics_over_many_draws():
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 259, (256, 256)).astype(np.int32)
  tokens[:, ::16] = TOK.bos_id  # Special ids sprinkled in.
  tokens[:, 7::16] = TOK.eos_id
  segments = np.ones_like(tokens)
  segments[:, 200:] = 0  # Padding.
  tokens[:, 200:] = TOK.pad_id
  inputs, targets, loss_mask = mlm.mask_tokens(tokens, segments, np.random.default_rng(1), SETTINGS)
  np.testing.assert_array_equal(targets, tokens)
  eligible = (segments > 0) & (tokens > 2)
  chosen = loss_mask > 0
  assert not np.any(chosen & ~eligible)
  assert chosen.sum() / eligible.sum() == pytest.approx(0.15, abs=0.005)
  masked = chosen & (inputs == SETTINGS.mask_id)
  randomised = chosen & (inputs != SETTINGS.mask_id) & (inputs != tokens)
  kept = chosen & (inputs == tokens)
  n = chosen.sum()
  # A random id equals the original one time in 256, which then counts as kept.
  assert masked.sum() / n == pytest.approx(0.8, abs=0.015)
  assert randomised.sum() / n == pytest.approx(0.1 * 255 / 256, abs=0.01)
  assert kept.sum() / n == pytest.approx(0.1 + 0.1 / 256, abs=0.01)
  assert np.all((inputs[randomised] >= 3) & (inputs[randomised] < 259))  # Regular ids only.
  assert len(np.unique(inputs[randomised])) > 200  # Spread over the vocabulary.
  # Nothing outside the chosen positions changes, and there is no loss there.
  np.testing.assert_array_equal(inputs[~chosen], tokens[~chosen])


def test_special_tokens_and_padding_are_never_chosen():
  tokens = np.tile(np.array([0, 1, 2], np.int32), (64, 100))
  segments = np.ones_like(tokens)
  all_on = mlm.settings(mlm_data(mlm_probability=1.0), TOK)
  inputs, _, loss_mask = mlm.mask_tokens(tokens, segments, np.random.default_rng(0), all_on)
  assert loss_mask.sum() == 0 and np.array_equal(inputs, tokens)
  regular = np.full((4, 50), 65, np.int32)
  _, _, loss_mask = mlm.mask_tokens(
    regular, np.zeros_like(regular), np.random.default_rng(0), all_on
  )
  assert loss_mask.sum() == 0  # Padding.


@pytest.mark.parametrize(
  'overrides, message',
  [
    (dict(mlm_probability=0.0), r'data.mlm_probability=0.0 must be in \(0, 1\]'),
    (dict(mlm_mask_fraction=1.2), r'data.mlm_mask_fraction=1.2 must be in \[0, 1\]'),
    (dict(mlm_mask_fraction=0.8, mlm_random_fraction=0.3), 'sum to at most 1'),
    (dict(objective='clm'), "data.objective='clm' is not one of lm, mlm"),
    (dict(dataset='synthetic'), "data.dataset='synthetic' is a stream for data.objective='lm'"),
  ],
)
def test_bad_mlm_settings_stop_with_a_clear_sentence(overrides, message):
  data = mlm_data(**overrides)
  with pytest.raises(ValueError, match=message):
    mlm.settings(data, TOK) if mlm.objective(data) == 'mlm' else None


def test_the_model_needs_a_row_for_the_mask_id():
  with pytest.raises(
    ValueError,
    match=r'model.vocab_size=259 has no row for the \[MASK\] id 259.*'
    r'set model.vocab_size >= 260',
  ):
    _iterator(
      mlm_data(tokenizer='byte'), split='train', batch_size=2, seq_len=8, seed=0, vocab_size=259
    )


def test_synthetic_mlm_stops_the_trainer_with_a_clear_sentence():
  c = config_lib.get_config()
  c.data.objective = 'mlm'
  with pytest.raises(ValueError, match="data.objective='mlm' needs text"):
    train.Trainer.create(c)


def test_pipeline_rows_are_masked_copies_of_their_documents():
  batches = [next(make()) for _ in range(6)]
  for b in batches:
    seg, inputs, targets, mask = b['segment_ids'], b['inputs'], b['targets'], b['loss_mask']
    assert np.all(mask[seg == 0] == 0)
    np.testing.assert_array_equal(inputs[mask == 0], targets[mask == 0])
    assert not np.any(np.isin(targets[mask > 0], [0, 1, 2]))
    for r in range(len(seg)):
      for s in np.unique(seg[r][seg[r] > 0]):
        ids = targets[r][seg[r] == s]
        # Not shifted: a whole document is [bos] text [eos], and inputs align with targets.
        if ids[0] == TOK.bos_id and ids[-1] == TOK.eos_id:
          assert TOK.decode(ids) in DOCS
  mask = np.concatenate([b['loss_mask'][b['segment_ids'] > 0] for b in batches])
  assert 0.08 < mask.mean() < 0.2


def test_masks_are_deterministic_and_differ_between_seeds_and_rows():
  a, b, c = make(seed=3), make(seed=3), make(seed=4)
  x, y, z = next(a), next(b), next(c)
  for k in x:
    np.testing.assert_array_equal(x[k], y[k])
  assert not np.array_equal(x['loss_mask'], z['loss_mask'])
  assert not np.array_equal(x['loss_mask'][0], x['loss_mask'][1])


@pytest.mark.parametrize('k', [0, 3])
def test_restored_pipeline_continues_with_the_same_masks(k):
  uninterrupted = make()
  expected = [next(uninterrupted) for _ in range(k + 3)][k:]
  first = make()
  for _ in range(k):
    next(first)
  state = json.loads(json.dumps(first.get_state()))  # As a checkpoint would store it.
  first.close()
  resumed = make()
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


@functools.cache
def _bert_params():
  tokens = jnp.zeros((1, 12), jnp.int32)
  return nn.unbox(jax.jit(Transformer(BERT).init)(jax.random.key(0), tokens)['params'])


_apply = jax.jit(Transformer(BERT).apply)


def test_the_encoder_sees_later_tokens():
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 3, 259)
  changed = tokens.at[:, 9].set(tokens[:, 9] % 200 + 4)
  before = _apply({'params': _bert_params()}, tokens)
  after = _apply({'params': _bert_params()}, changed)
  assert np.all(np.abs(before[:, :9] - after[:, :9]).max(axis=-1) > 1e-5)


def test_packed_segments_and_padding_do_not_see_each_other():
  tokens = jax.random.randint(jax.random.key(1), (1, 12), 3, 259)
  segments = jnp.array([[1] * 5 + [2] * 4 + [0] * 3])
  positions = jnp.array([list(range(5)) + list(range(4)) + [0] * 3])

  def logits(t):
    return _apply({'params': _bert_params()}, t, positions, segments)

  base_logits = logits(tokens)
  second = logits(tokens.at[0, 6].set(7))  # Inside segment 2.
  np.testing.assert_allclose(second[0, :5], base_logits[0, :5], atol=1e-6)
  assert np.abs(second[0, 5:9] - base_logits[0, 5:9]).max() > 1e-4  # Both ways within it.
  padding = logits(tokens.at[0, 10].set(7))
  np.testing.assert_allclose(padding[0, :9], base_logits[0, :9], atol=1e-6)
  first = logits(tokens.at[0, 4].set(7))  # The last of segment 1.
  np.testing.assert_allclose(first[0, 5:9], base_logits[0, 5:9], atol=1e-6)
  assert np.abs(first[0, :4] - base_logits[0, :4]).max() > 1e-4


def test_a_few_mlm_steps_lower_the_loss():
  c = config_lib.get_config()
  c.data.update(objective='mlm', dataset='text_files')
  c.model = config_lib.model_config(**dataclasses.asdict(BERT))
  c.batch_size, c.seq_len, c.total_steps = 8, 32, 20
  c.optim.update(learning_rate=3e-3, warmup_steps=3, weight_decay=0.01)
  trainer = train.Trainer.create(c, jax.devices()[:1])
  state = trainer.init_state()
  it = make(rows=8)
  losses = []
  for _ in range(c.total_steps):
    state, m = trainer.step(state, next(it))
    losses.append(float(m['loss']))
  assert losses[0] > 0.9 * np.log(260)
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:3]), losses


def test_evaluation_scores_the_masked_tokens_with_accuracy_and_no_bits_per_byte(tmp_path):
  (tmp_path / 'a.txt').write_text('\n'.join(DOCS))
  data = mlm_data(
    data_dir=str(tmp_path / 'data'),
    text_files=str(tmp_path / 'a.txt'),
    text_unit='line',
    validation_fraction=0.3,
  )
  got = lm.evaluate_split(BERT, _bert_params(), data, batch_size=4, seq_len=32, prepare=True)
  again = lm.evaluate_split(BERT, _bert_params(), data, batch_size=4, seq_len=32)
  assert got == again  # The same masks at every evaluation.
  assert 'bits_per_byte' not in got
  nll = tokens = correct = 0.0
  for b in _iterator(
    data, split='validation', batch_size=4, seq_len=32, seed=0, shuffle=False, num_epochs=1
  ):
    logits = _apply({'params': _bert_params()}, b['inputs'], b['positions'], b['segment_ids'])
    logp = jax.nn.log_softmax(logits)
    nll -= float(
      jnp.sum(jnp.take_along_axis(logp, b['targets'][..., None], -1)[..., 0] * b['loss_mask'])
    )
    correct += float(jnp.sum((jnp.argmax(logits, -1) == b['targets']) * b['loss_mask']))
    tokens += float(b['loss_mask'].sum())
  assert got['tokens'] == tokens > 0
  assert got['loss'] == pytest.approx(nll / tokens, rel=1e-5)
  assert got['accuracy'] == pytest.approx(correct / tokens)
