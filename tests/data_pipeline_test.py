"""The grain pipeline: packing, determinism, resumption, host sharding, padding."""

import json

import numpy as np
import pytest

from llm import config as config_lib
from llm.data import pipeline, streams, synthetic, tokenizer
from llm.model import ModelConfig


def _iterator(data, *, vocab_size=None, **stream):
  """`stream`'s batches through the one dispatch training and evaluation use."""
  model_cfg = None if vocab_size is None else ModelConfig(vocab_size=vocab_size)
  return streams.make_iterator(streams.Stream(data, **stream), model_cfg)


TOK = tokenizer.ByteTokenizer()
# Lengths from 1 to ~90 bytes: many documents per 32-token row, and some longer than a row.
DOCS = [f'doc {i}: ' + 'abcdefghij'[i % 10] * (i * 7 % 83) for i in range(60)]
SOURCE = [{'text': d.encode()} for d in DOCS]


def make(seq_len=32, rows=4, seed=0, shuffle=True, num_epochs=1, index=0, count=1):
  dataset = pipeline.build(
    SOURCE,
    TOK,
    stream=streams.Stream(
      None,
      'train',
      batch_size=rows * count,
      seq_len=seq_len,
      seed=seed,
      shuffle=shuffle,
      num_epochs=num_epochs,
      process_index=index,
      process_count=count,
    ),
    field='text',
  )
  return pipeline.Iterator(dataset, {'seed': seed})


def documents(batches) -> list[str]:
  """Reassembles the documents from the stream: every input token in order, cut at bos."""
  stream = np.concatenate([b['inputs'][b['segment_ids'] > 0] for b in batches])
  cuts = np.flatnonzero(stream == TOK.bos_id)
  return [TOK.decode(piece) for piece in np.split(stream, cuts)[1:]]


def test_batch_format():
  batch = next(make())
  assert set(batch) == {'inputs', 'targets', 'segment_ids', 'positions', 'loss_mask'}
  for key, value in batch.items():
    assert value.shape == (4, 32), key
    assert value.dtype == (np.float32 if key == 'loss_mask' else np.int32), key


def test_packing_keeps_documents_apart_and_loses_nothing():
  batches = list(make(shuffle=False))
  for b in batches:
    for r in range(b['inputs'].shape[0]):
      seg, pos = b['segment_ids'][r], b['positions'][r]
      inputs, targets, mask = b['inputs'][r], b['targets'][r], b['loss_mask'][r]
      np.testing.assert_array_equal(mask, (seg > 0).astype(np.float32))
      assert np.all(inputs[seg == 0] == TOK.pad_id) and np.all(targets[seg == 0] == TOK.pad_id)
      real = seg[seg > 0]
      assert np.all(np.diff(real) >= 0) and np.all(np.diff(np.unique(real)) == 1)
      for s in np.unique(real):
        where = seg == s
        np.testing.assert_array_equal(pos[where], np.arange(where.sum()))
        # Within a segment, each target is the next input: one document, no crossing.
        np.testing.assert_array_equal(inputs[where][1:], targets[where][:-1])
        # bos only opens a segment; eos only closes one.
        assert TOK.bos_id not in inputs[where][1:]
        assert TOK.eos_id not in targets[where][:-1]
        if inputs[where][0] != TOK.bos_id:
          assert s == 1, 'only a row can start in the middle of a document'
  # Every document exactly once, every token kept, in stored order; an eos closes each.
  assert documents(batches) == DOCS
  targets = np.concatenate([b['targets'][b['segment_ids'] > 0] for b in batches])
  assert (targets == TOK.eos_id).sum() == len(DOCS)
  assert sum(b['loss_mask'].sum() for b in batches) == sum(len(d) + 1 for d in DOCS)


def test_finite_stream_pads_the_last_batch_then_stops():
  it = make(seq_len=64, rows=8)
  batches = list(it)
  assert all(b['inputs'].shape == (8, 64) for b in batches)
  assert batches[-1]['segment_ids'][-1].sum() == 0  # A padding row.
  with pytest.raises(StopIteration):
    next(it)


def test_same_seed_same_batches_other_seed_other_order():
  a, b, c = (make(seed=s, num_epochs=None) for s in (3, 3, 4))
  for _ in range(5):
    x, y, z = next(a), next(b), next(c)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert not np.array_equal(x['inputs'], z['inputs'])


def test_epochs_are_reshuffled():
  batches = list(make(num_epochs=2))
  docs = documents(batches)
  assert sorted(docs[: len(DOCS)]) == sorted(docs[len(DOCS) :]) == sorted(DOCS)
  assert docs[: len(DOCS)] != docs[len(DOCS) :]


@pytest.mark.parametrize('k', [0, 1, 3, 7])
def test_restored_pipeline_continues_exactly(k):
  uninterrupted = make(num_epochs=None)
  expected = [next(uninterrupted) for _ in range(k + 4)][k:]
  first = make(num_epochs=None)
  for _ in range(k):
    next(first)
  state = json.loads(json.dumps(first.get_state()))  # As a checkpoint would store it.
  first.close()
  resumed = make(num_epochs=None)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_state_from_another_stream_is_refused():
  state = make(seed=1).get_state()
  with pytest.raises(ValueError, match='seed=1'):
    make(seed=2).set_state(state)


class Recording(list):
  """A source that remembers which records were read."""

  def __init__(self, records):
    super().__init__(records)
    self.read = set()

  def __getitem__(self, i):
    self.read.add(i)
    return super().__getitem__(i)


def test_hosts_read_disjoint_slices_covering_the_split():
  """Training streams: each host reads only its own documents; together, all of them."""
  per_host, read = [], []
  for i in range(2):
    source = Recording(SOURCE)
    it = pipeline.build(
      source,
      TOK,
      stream=streams.Stream(
        None,
        'train',
        batch_size=2 * 2,
        seq_len=32,
        seed=0,
        shuffle=True,
        num_epochs=None,
        process_index=i,
        process_count=2,
      ),
      field='text',
      read_threads=1,
      prefetch_batches=1,
    )
    # Enough batches for one epoch of this host's 30 documents (and one more document).
    per_host.append(documents([b for b, _ in zip(it, range(40), strict=False)])[:30])
    read.append(source.read)
  assert read[0].isdisjoint(read[1]) and read[0] | read[1] == set(range(len(SOURCE)))
  assert sorted(per_host[0] + per_host[1]) == sorted(DOCS)


def test_finite_stream_gives_every_host_the_same_number_of_batches():
  """Evaluation: hosts take their rows of each global batch, so none stops early."""
  whole = list(make(rows=4, shuffle=False))
  hosts = [list(make(rows=2, shuffle=False, index=i, count=2)) for i in range(2)]
  assert len(hosts[0]) == len(hosts[1]) == len(whole)
  for b, h0, h1 in zip(whole, *hosts, strict=True):
    for k in b:
      np.testing.assert_array_equal(np.concatenate([h0[k], h1[k]]), b[k])


def test_more_hosts_than_documents():
  with pytest.raises(ValueError, match='no documents'):
    pipeline.build(
      SOURCE[:1],
      TOK,
      stream=streams.Stream(
        None,
        'train',
        batch_size=1 * 2,
        seq_len=8,
        seed=0,
        shuffle=False,
        num_epochs=None,
        process_index=0,
        process_count=2,
      ),
      field='text',
    )


def test_missing_text_field():
  with pytest.raises(ValueError, match="text_field='body'.*text"):
    pipeline.build(
      SOURCE,
      TOK,
      stream=streams.Stream(
        None,
        'train',
        batch_size=1,
        seq_len=8,
        seed=0,
        shuffle=False,
        num_epochs=1,
        process_index=0,
        process_count=1,
      ),
      field='body',
    )


@pytest.mark.parametrize(
  'kwargs, message',
  [
    (dict(seq_len=0), 'seq_len=0'),
    (dict(batch_size=0), 'batch_size=0'),
    (dict(batch_size=3, process_count=2), 'batch_size=3 is not divisible'),
    (dict(num_epochs=0), 'num_epochs=0'),
  ],
)
def test_bad_sizes(kwargs, message):
  args = dict(split='train', batch_size=4, seq_len=8, seed=0, process_index=0, process_count=1)
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    _iterator(config_lib.data_config(), vocab_size=16, **args)


def test_synthetic_dataset():
  cfg = config_lib.data_config()
  it = _iterator(
    cfg,
    split='train',
    batch_size=4,
    seq_len=8,
    seed=0,
    vocab_size=16,
    process_count=2,
    process_index=1,
  )
  assert isinstance(it, synthetic.SyntheticIterator)
  assert next(it)['inputs'].shape == (2, 8)


def test_worker_processes_give_the_same_stream_and_resume():
  def run(worker_count, state=None):
    dataset = pipeline.build(
      SOURCE,
      TOK,
      stream=streams.Stream(
        None,
        'train',
        batch_size=4,
        seq_len=32,
        seed=0,
        shuffle=True,
        num_epochs=None,
        process_index=0,
        process_count=1,
      ),
      field='text',
      worker_count=worker_count,
    )
    it = pipeline.Iterator(dataset, {}, copy=worker_count > 0)
    if state:
      it.set_state(state)
    return it

  workers = run(1)
  threads = run(0)
  for _ in range(3):
    a, b = next(workers), next(threads)
    np.testing.assert_array_equal(a['inputs'], b['inputs'])
  state = json.loads(json.dumps(workers.get_state()))
  expected = [next(workers) for _ in range(2)]
  workers.close()
  resumed = run(1, state)
  for want in expected:
    np.testing.assert_array_equal(next(resumed)['targets'], want['targets'])
  resumed.close()


def test_synthetic_num_sequences_must_be_positive():
  cfg = config_lib.data_config()
  cfg.synthetic_num_sequences = 0
  with pytest.raises(ValueError, match='data.synthetic_num_sequences=0 must be a positive number'):
    _iterator(cfg, split='train', batch_size=4, seq_len=8, seed=0, vocab_size=16, process_count=1)


def test_identity_of_the_synthetic_stream():
  cfg = config_lib.data_config()
  identity = streams.identity(cfg)
  assert identity == {'dataset': 'synthetic', 'num_sequences': 64}
  assert streams.skipped_report(cfg) == ''
  cfg.synthetic_num_sequences = 8
  assert streams.describe_change(identity, streams.identity(cfg)) == (
    'data.synthetic_num_sequences changed (64 -> 8)'
  )


TEXT_FILES = {
  'dataset': 'text_files',
  'prepared': 'text_files/0123456789ab-aaaaaaaa/1.0.0',
  'split': 'train',
  'documents': {'train': 10, 'validation': 2},
  'tokenizer': 'sentencepiece sha256:1a2b',
}


@pytest.mark.parametrize(
  'current, change',
  [
    ({}, ''),
    ({'dataset': 'shakespeare'}, "data.dataset changed ('text_files' -> 'shakespeare')"),
    (
      {'tokenizer': 'byte', 'prepared': 'text_files/0123456789ab-bbbbbbbb/1.0.0'},
      'data.text_files now matches other files (text_files/0123456789ab-aaaaaaaa/1.0.0 -> '
      'text_files/0123456789ab-bbbbbbbb/1.0.0) and the tokenizer changed '
      '(sentencepiece sha256:1a2b -> byte)',
    ),
    (
      {'prepared': 'text_files/ffffffffffff-aaaaaaaa/1.0.0', 'documents': {'train': 11}},
      'data.text_files or how it is read (text_unit, text_field, ...) changed '
      '(text_files/0123456789ab-aaaaaaaa/1.0.0 -> text_files/ffffffffffff-aaaaaaaa/1.0.0) '
      'and the prepared dataset holds other documents (train 10, validation 2 -> train 11)',
    ),
    ({'split': 'train[:90%]'}, "data.train_split changed ('train' -> 'train[:90%]')"),
  ],
)
def test_describe_change(current, change):
  got = streams.describe_change(TEXT_FILES, {**TEXT_FILES, **current})
  assert got == change
