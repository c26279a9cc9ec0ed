"""Fine-tuning: SFT masks and packing, classification, init_from, bad input."""

import json

import jax
import numpy as np
import pytest

from llm import config as config_lib
from llm import losses, train
from llm.convert import commands
from llm.data import classification, sft, streams
from llm.data import tokenizer as tokenizer_lib
from llm.io import checkpoint, models
from llm.model import ModelConfig

TOK = tokenizer_lib.ByteTokenizer()


def _write(path, rows):
  path.write_text(''.join((r if isinstance(r, str) else json.dumps(r)) + '\n' for r in rows))
  return str(path)


def _data(dataset, train_files, eval_files='', **overrides):
  d = config_lib.data_config()
  d.dataset, d.tokenizer, d.train_files, d.eval_files = dataset, 'byte', train_files, eval_files
  d.update(overrides)
  return d


def _text(ids):
  return bytes(int(t) - 3 for t in ids if t > 2).decode()


def _iter(d, split='train', batch_size=4, seq_len=64, causal=None, token_types=None, **kw):
  stream = streams.Stream(
    d, split, batch_size, seq_len, seed=0, process_index=0, process_count=1, **kw
  )
  if d.dataset == 'sft':
    return sft.make_iterator(stream)
  model = {k: v for k, v in dict(causal=causal, token_types=token_types).items() if v is not None}
  return classification.make_iterator(stream, **model)


CHAT = {
  'messages': [
    {'role': 'system', 'content': 'Be brief.'},
    {'role': 'user', 'content': '2+2?'},
    {'role': 'assistant', 'content': 'four'},
    {'role': 'user', 'content': 'and 3+3?'},
    {'role': 'assistant', 'content': 'six'},
  ]
}


# ----------------------------------------------------------------------------
# SFT.


def test_sft_loss_is_only_on_assistant_tokens_and_their_eos():
  ex = sft.example(CHAT, 'x:1', TOK, seq_len=128, truncation='error')
  tokens = np.concatenate([[TOK.bos_id], ex['targets']])
  assert _text(tokens) == (
    '<|system|>\nBe brief.\n<|user|>\n2+2?\n<|assistant|>\nfour<|user|>\nand 3+3?\n'
    '<|assistant|>\nsix'
  )
  learned = ex['targets'][ex['loss_mask'] == 1]
  assert _text(learned) == 'foursix'
  assert (learned == TOK.eos_id).sum() == 2 and learned[-1] == TOK.eos_id
  # Every eos is a target with loss; no user, system or header byte is.
  assert np.all(ex['loss_mask'][ex['targets'] == TOK.eos_id] == 1)
  np.testing.assert_array_equal(ex['inputs'][1:], ex['targets'][:-1])
  pair = sft.example(
    {'prompt': 'Hi', 'response': 'Hello'}, 'x:2', TOK, seq_len=64, truncation='error'
  )
  assert _text(pair['targets'][pair['loss_mask'] == 1]) == 'Hello'
  assert _text(pair['inputs']) == sft.render_prompt('Hi') + 'Hello'


def test_sft_packs_whole_examples_with_restarting_positions(tmp_path):
  rows = [{'prompt': 'p' * n, 'response': 'r' * (n % 5 + 1)} for n in range(1, 21)]
  d = _data('sft', _write(tmp_path / 'a.jsonl', rows))
  seen, most = [], 0
  for b in _iter(d, batch_size=2, seq_len=64, shuffle=False, num_epochs=1):
    for r in range(2):
      for s in set(b['segment_ids'][r].tolist()) - {0}:
        at = b['segment_ids'][r] == s
        np.testing.assert_array_equal(b['positions'][r][at], np.arange(at.sum()))
        assert b['inputs'][r][at][0] == TOK.bos_id  # Every segment is a whole example.
        seen.append(_text(b['targets'][r][at & (b['loss_mask'][r] == 1)]))
      assert np.all(b['loss_mask'][r][b['segment_ids'][r] == 0] == 0)
      most = max(most, b['segment_ids'][r].max())
  assert sorted(seen) == sorted(r['response'] for r in rows)
  assert most > 1  # Several examples per row.


def test_sft_iterator_resumes_exactly(tmp_path):
  d = _data(
    'sft', _write(tmp_path / 'a.jsonl', [{'prompt': str(i), 'response': 'ok'} for i in range(9)])
  )
  it = _iter(d, batch_size=2, seq_len=32)
  [next(it) for _ in range(3)]
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  again = _iter(d, batch_size=2, seq_len=32)
  again.set_state(state)
  for want in expected:
    got = next(again)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_sft_overlong_example_follows_the_truncation_policy(tmp_path):
  path = _write(
    tmp_path / 'a.jsonl',
    [{'prompt': 'x', 'response': 'y'}, {'prompt': 'p' * 80, 'response': 'abc'}],
  )
  with pytest.raises(
    ValueError, match=r'a.jsonl:2: the example is \d+ tokens long, more than seq_len=40'
  ):
    _iter(_data('sft', path), seq_len=40)
  b = next(_iter(_data('sft', path, truncation='left'), seq_len=40, shuffle=False))
  assert 'abc' in [_text(b['targets'][r][b['loss_mask'][r] == 1]) for r in range(4)]
  assert b['segment_ids'].shape == (4, 40)
  out = list(_iter(_data('sft', path, truncation='drop'), seq_len=40, num_epochs=1))
  assert sum(len(set(s.tolist()) - {0}) for b in out for s in b['segment_ids']) == 1


@pytest.mark.parametrize(
  'line, message',
  [
    ({'prompt': 'x'}, r"a.jsonl:2 lacks the field 'response' \(it has prompt\)"),
    ({'text': 'x'}, r"a.jsonl:2 lacks the field 'messages', or 'prompt' and 'response'"),
    ('{"prompt": "x",', r'a.jsonl:2 is not valid JSON'),
    ({'messages': [{'role': 'bot', 'content': 'x'}]}, r"messages\[0\] has role 'bot'"),
    ({'messages': [{'role': 'user', 'content': 'x'}]}, r'a.jsonl:2 has no assistant turn'),
  ],
)
def test_sft_bad_lines_stop_naming_file_line_and_field(tmp_path, line, message):
  path = _write(tmp_path / 'a.jsonl', [{'prompt': 'a', 'response': 'b'}, line])
  with pytest.raises(ValueError, match=message):
    _iter(_data('sft', path))


# ----------------------------------------------------------------------------
# Classification.


def test_classification_rows(tmp_path):
  rows = [{'text': 'ab', 'label': 'neg'}, {'text': 'xyz', 'label': 'pos', 'text_pair': 'q'}]
  d = _data('classification', _write(tmp_path / 'a.jsonl', rows), labels='neg,pos')
  one = dict(batch_size=4, seq_len=8, shuffle=False, num_epochs=1)
  enc = next(_iter(d, **one, causal=False, token_types=True))
  dec = next(_iter(d, **one, causal=True))
  assert enc['targets'].tolist() == [[0], [1], [0], [0]]
  assert enc['loss_mask'].tolist() == [[1], [1], [0], [0]]  # Padding rows of a short batch.
  assert enc['logits_index'].tolist() == [0, 0, 0, 0]
  assert dec['logits_index'][:2].tolist() == [3, 6]  # The last eos.
  assert dec['inputs'][1].tolist() == [1, *TOK.encode('xyz'), 2, *TOK.encode('q'), 2, 0]
  assert enc['token_types'][1].tolist() == [0, 0, 0, 0, 0, 1, 1, 0]
  assert 'token_types' not in dec
  assert enc['segment_ids'][0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]


def test_classification_bad_input(tmp_path):
  d = _data(
    'classification',
    _write(tmp_path / 'a.jsonl', [{'text': 'a', 'label': 'meh'}]),
    labels='neg,pos',
  )
  with pytest.raises(
    ValueError, match=r"a.jsonl:1 has the label 'meh', which is not in data.labels \(neg, pos\)"
  ):
    _iter(d)
  d.train_files = _write(tmp_path / 'b.jsonl', [{'txt': 'a', 'label': 'neg'}])
  with pytest.raises(ValueError, match=r"b.jsonl:1 lacks the field 'text'"):
    _iter(d)
  d.train_files = _write(tmp_path / 'c.jsonl', [{'text': 'a' * 20, 'label': 'neg'}])
  with pytest.raises(
    ValueError, match=r'c.jsonl:1: the text is 22 tokens long, more than seq_len=8'
  ):
    _iter(d, seq_len=8)
  c = _tiny(d, head='classifier', num_labels=3)
  with pytest.raises(
    ValueError, match=r'model.num_labels=3 differs from the 2 classes of data.labels'
  ):
    streams.make_iterator(streams.Stream.of(c, 'train'), ModelConfig.from_dict(c.model))


def test_macro_f1_and_accuracy():
  # true x predicted: class 0 2 right 1 wrong; class 1 1 right; class 2 absent.
  m = losses.classification_metrics([[2, 1, 0], [0, 1, 0], [0, 0, 0]])
  assert m['accuracy'] == pytest.approx(3 / 4)
  assert m['macro_f1'] == pytest.approx((2 * 2 / (3 + 2) + 2 * 1 / (1 + 2)) / 2)


def _tiny(data, **model):
  c = config_lib.get_config()
  shape = dict(vocab_size=259, num_layers=1, d_model=32, num_heads=2, num_kv_heads=2, d_ff=64)
  c.model = config_lib.model_config(**{**shape, 'max_seq_len': 32, **model})
  c.data = data
  c.batch_size, c.seq_len, c.total_steps = 16, 16, 30
  c.log_every, c.eval_every, c.eval_steps, c.checkpoint_every = 10, 30, 0, 1000
  c.optim.learning_rate, c.optim.warmup_steps = 1e-2, 2
  c.peak_flops = 1e12  # Skips measuring the CPU's.
  return c


@pytest.mark.parametrize('causal', [True, False])
def test_classifier_learns_a_separable_task(tmp_path, causal):
  rng = np.random.default_rng(0)

  def rows(n):
    labels = rng.integers(0, 2, n)
    return [
      {
        'text': ''.join(rng.choice(list('abc' if y else 'xyz'), rng.integers(3, 10))),
        'label': int(y),
      }
      for y in labels
    ]

  d = _data(
    'classification',
    _write(tmp_path / 't.jsonl', rows(200)),
    _write(tmp_path / 'e.jsonl', rows(40)),
    labels='0,1',
  )
  extra = (
    {}
    if causal
    else dict(
      causal=False,
      norm_position='post',
      norm='layernorm',
      mlp='gelu_exact',
      position='learned',
      type_vocab_size=2,
    )
  )
  c = _tiny(d, head='classifier', num_labels=2, **extra)
  train.train_and_evaluate(c, str(tmp_path / 'run'))
  row = json.loads((tmp_path / 'run' / 'eval.jsonl').read_text().splitlines()[-1])
  assert row['accuracy'] >= 0.95 and row['macro_f1'] >= 0.95, row
  assert row['examples'] == 40


# ----------------------------------------------------------------------------
# init_from.


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """A workdir trained 3 steps (so Adam's moments are not zero) and its params."""
  workdir = str(tmp_path_factory.mktemp('base'))
  c = _tiny(config_lib.data_config())
  c.total_steps, c.eval_every = 3, 0
  train.train_and_evaluate(c, workdir)
  params = models.open(workdir).read()
  return workdir, params


def test_init_from_restores_params_but_not_the_optimizer_state(pretrained, tmp_path, capsys):
  base_dir, source = pretrained
  d = _data(
    'classification', _write(tmp_path / 't.jsonl', [{'text': 'a', 'label': 'x'}]), labels='x,y'
  )
  c = _tiny(d, head='classifier', num_labels=2)
  c.init_from = base_dir
  trainer = train.Trainer.create(c)
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'ft'))
  state, _ = trainer.restore_or_init(ckpt)
  out = capsys.readouterr().out
  assert 'new, freshly initialised: classifier/bias, classifier/kernel' in out
  assert int(state['step']) == 0
  for k in source:
    if k != 'unembed':
      jax.tree.map(np.testing.assert_array_equal, state['params'][k], source[k])
  assert 'unembed' not in state['params'] and 'dropped, not in this model: unembed' in out
  moments = [x for x in jax.tree.leaves(state['opt_state']) if x.ndim > 0]
  assert moments and all(not np.any(np.asarray(x)) for x in moments)
  # The same from a params export.
  commands.write_params(base_dir, str(tmp_path / 'export'))
  c.init_from = str(tmp_path / 'export')
  state2, _ = train.Trainer.create(c).restore_or_init(ckpt)
  jax.tree.map(np.testing.assert_array_equal, state2['params']['layers'], source['layers'])
  # A run with its own checkpoint resumes it: init_from is not even read.
  trainer = train.Trainer.create(c)
  state, it = trainer.restore_or_init(ckpt)
  ckpt.save(1, state, it.get_state(), c)
  ckpt.wait()
  c.init_from = str(tmp_path / 'nothing_here')
  capsys.readouterr()
  resumed, _ = train.Trainer.create(c).restore_or_init(ckpt)
  assert 'Resumed from step 1' in capsys.readouterr().out
  jax.tree.map(np.testing.assert_array_equal, resumed['params'], state['params'])
  ckpt.close()


def test_init_from_with_another_shape_names_the_param(pretrained, tmp_path):
  c = _tiny(config_lib.data_config(), d_ff=96)
  c.eval_every, c.init_from = 0, pretrained[0]
  with pytest.raises(
    ValueError, match=r'The param layers/mlp/\S+ has shape .* but .* in this model'
  ):
    train.Trainer.create(c).restore_or_init(checkpoint.Checkpointer(str(tmp_path / 'ft')))
