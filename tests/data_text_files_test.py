"""The text_files dataset: formats, splits, bad input, and the end-to-end pipeline on it."""

import gzip
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath

from llm import config as config_lib
from llm.data import prepare, sources, streams, text_files, tokenizer
from llm.model import ModelConfig


def _iterator(data, *, vocab_size=None, **stream):
  """`stream`'s batches through the one dispatch training and evaluation use."""
  model_cfg = None if vocab_size is None else ModelConfig(vocab_size=vocab_size)
  return streams.make_iterator(streams.Stream(data, **stream), model_cfg)


LINES = [f'line {i}: the quick brown fox jumps over the lazy dog {i * i}' for i in range(40)]


def config(tmp_path, pattern, **overrides):
  cfg = config_lib.data_config()
  cfg.dataset = 'text_files'
  cfg.data_dir = str(tmp_path / 'data')
  cfg.text_files = str(tmp_path / pattern)
  cfg.validation_fraction = 0.3
  cfg.update(overrides)
  return cfg


def prepared_texts(cfg, split):
  source = sources.data_source(cfg, split)
  return [source[i]['text'].decode() for i in range(len(source))]


def write(path, data: bytes):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(gzip.compress(data) if path.name.endswith('.gz') else data)


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """Good and bad files of every supported kind."""
  root = tmp_path_factory.mktemp('corpus')
  write(root / 'a.txt', '\n'.join(LINES[:20]).encode())
  write(root / 'sub' / 'b.txt.gz', '\n'.join(LINES[20:]).encode())
  write(root / 'empty.txt', b'   \n')
  write(root / 'image.txt', b'\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR')
  write(root / 'latin1.txt', 'caf\xe9 cr\xe8me'.encode('latin-1'))
  records = [json.dumps({'text': line, 'id': i}) for i, line in enumerate(LINES)]
  records += ['{not json', json.dumps({'body': 'no text field'}), json.dumps({'text': 3})]
  write(root / 'c.jsonl', '\n'.join(records).encode())
  write(root / 'd.jsonl.gz', json.dumps({'text': 'gzipped record'}).encode())
  return root


def test_line_documents_splits_and_summary(corpus, tmp_path):
  cfg = config(corpus, '**/*.txt*', text_unit='line', data_dir=str(tmp_path / 'data'))
  b = sources.prepare(cfg)
  train, val = prepared_texts(cfg, 'train'), prepared_texts(cfg, 'validation')
  assert sorted(train + val) == sorted(LINES + ['caf\ufffd cr\ufffdme'])
  assert 0 < len(val) < len(train)
  summary = sources.summary(b)
  assert summary['empty_files'] == 1 and summary['binary_files'] == 1
  assert (
    summary['train'].get('invalid_utf8_replaced', 0)
    + summary['validation'].get('invalid_utf8_replaced', 0)
    == 1
  )
  assert epath.Path(b.data_dir, 'metadata.json').exists()


def test_split_is_a_function_of_the_document_name(corpus, tmp_path):
  """The same document lands in the same split whatever else is in the corpus."""
  small = config(corpus, 'a.txt', text_unit='line', data_dir=str(tmp_path / 'small'))
  full = config(corpus, '*.txt', text_unit='line', data_dir=str(tmp_path / 'full'))
  small_val = set(prepared_texts(small, 'validation'))
  full_val = set(prepared_texts(full, 'validation'))
  assert small_val and small_val == full_val & set(LINES[:20])


def test_jsonl_records_and_bad_lines(corpus, tmp_path):
  cfg = config(corpus, '*.jsonl*', data_dir=str(tmp_path / 'data'))
  b = sources.prepare(cfg)
  texts = prepared_texts(cfg, 'train') + prepared_texts(cfg, 'validation')
  assert sorted(texts) == sorted(LINES + ['gzipped record'])
  summary = sources.summary(b)
  skipped = {
    k: summary['train'].get(k, 0) + summary['validation'].get(k, 0)
    for k in ('not_json', 'missing_field', 'field_not_text')
  }
  assert skipped == {'not_json': 1, 'missing_field': 1, 'field_not_text': 1}
  assert any('c.jsonl:41: not_json' in e for e in summary['skipped_examples'])


def test_jsonl_field_is_configurable(tmp_path):
  write(tmp_path / 'x.jsonl', '\n'.join(json.dumps({'body': s}) for s in LINES).encode())
  cfg = config(tmp_path, 'x.jsonl', text_field='body')
  assert len(prepared_texts(cfg, 'train')) + len(prepared_texts(cfg, 'validation')) == 40


def test_file_and_passage_documents(tmp_path):
  for i in range(12):
    write(tmp_path / f'book{i}.txt', ('\n\n'.join(LINES[i : i + 20]) + '\n').encode())
  whole = config(tmp_path, 'book*.txt', validation_fraction=0.4)
  docs = prepared_texts(whole, 'train') + prepared_texts(whole, 'validation')
  assert len(docs) == 12 and all(d.endswith('\n') for d in docs)
  cut = config(tmp_path, 'book*.txt', text_unit='passage', passage_chars=200)
  pieces = prepared_texts(cut, 'train') + prepared_texts(cut, 'validation')
  assert len(pieces) > 24 and all(len(p) < 400 for p in pieces)


def test_passages_cut_at_blank_lines():
  text = 'aaaa\nbbbb\n\ncccc\n\n\n\ndddd\n\neeee\n'
  assert text_files.passages(text, 4) == ['aaaa\nbbbb', 'cccc', 'dddd', 'eeee']
  assert text_files.passages(text, 5) == ['aaaa\nbbbb', 'cccc', 'dddd\n\neeee']
  assert text_files.passages(text, 100) == [text.strip('\n')]
  assert text_files.passages('\n\n', 5) == []


@pytest.mark.parametrize(
  'files, pattern, error, message',
  [
    ({}, 'missing/*.txt', FileNotFoundError, 'missing/\\*.txt.* matches no files'),
    ({}, 'nowhere.txt', FileNotFoundError, 'nowhere.txt.* matches no files'),
    ({'notes.md': b'# hi'}, '*', ValueError, 'notes.md is not a supported text file'),
    ({'x.txt.gz': b'not gzip'}, '*.gz', ValueError, 'x.txt.gz is not a valid gzip file'),
    ({'e.txt': b'', 'f.txt': b'\n\n'}, '*.txt', ValueError, 'no documents.*empty_files=2'),
    ({'b.jsonl': b'[1]\n{"a": 1}\n'}, '*.jsonl', ValueError, 'no documents.*missing_field=2'),
    (
      {'one.txt': b'only one document'},
      '*.txt',
      ValueError,
      'split .* no documents .* in the other split',
    ),
  ],
)
def test_bad_corpus_stops_with_a_sentence(tmp_path, files, pattern, error, message):
  for name, data in files.items():
    (tmp_path / name).write_bytes(data)
  cfg = config(tmp_path, pattern)
  with pytest.raises(error, match=message):
    sources.prepare(cfg)
  # Nothing half-written looks complete.
  assert not list((tmp_path / 'data').glob('**/dataset_info.json'))


@pytest.mark.parametrize(
  'overrides, message',
  [
    (dict(text_files=''), 'data.text_files is empty'),
    (dict(text_unit='sentence'), "text_unit='sentence'"),
    (dict(validation_fraction=1.0), 'validation_fraction=1.0'),
  ],
)
def test_bad_settings(tmp_path, overrides, message):
  cfg = config(tmp_path, '*.txt', **overrides)
  with pytest.raises(ValueError, match=message):
    sources.prepare(cfg)


def test_catalog_dataset_not_prepared(tmp_path):
  cfg = config_lib.data_config()
  cfg.dataset = 'lm1b'
  cfg.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="'lm1b' is not prepared.*tfds build lm1b"):
    sources.data_source(cfg, 'train')


def test_prepare_tokenizer_and_pipeline_end_to_end(corpus, tmp_path):
  """First use prepares the data and trains the tokenizer; batches decode to the corpus."""
  cfg = config(corpus, 'a.txt', text_unit='line', data_dir=str(tmp_path / 'data'))
  cfg.tokenizer = ''
  cfg.spm_vocab_size = 300
  it = _iterator(
    cfg,
    split='validation',
    batch_size=2,
    seq_len=64,
    seed=0,
    shuffle=False,
    num_epochs=1,
    vocab_size=512,
    process_index=0,
    process_count=1,
  )
  tok = tokenizer.load(cfg)
  assert sources.tokenizer_path(cfg).exists() and tok.vocab_size == 300
  stream = np.concatenate([b['inputs'][b['segment_ids'] > 0] for b in it])
  docs = [tok.decode(d) for d in np.split(stream, np.flatnonzero(stream == tok.bos_id))[1:]]
  assert docs == prepared_texts(cfg, 'validation')
  report = prepare.run(cfg)  # Already prepared: only reports.
  assert report['validation']['tokens'] == len(stream) - len(docs) + len(docs)
  assert 0 < report['validation']['unigram_entropy'] < np.log(300)


def test_model_vocab_too_small(corpus, tmp_path):
  cfg = config(corpus, 'a.txt', text_unit='line', data_dir=str(tmp_path / 'data'))
  with pytest.raises(ValueError, match='model.vocab_size=100 is smaller than the tokenizer'):
    _iterator(
      cfg,
      split='train',
      batch_size=2,
      seq_len=8,
      seed=0,
      vocab_size=100,
      process_index=0,
      process_count=1,
    )


def test_vocab_larger_than_prepared_corpus_supports(corpus, tmp_path):
  cfg = config(corpus, 'a.txt', text_unit='line', data_dir=str(tmp_path / 'data'))
  cfg.tokenizer = ''
  cfg.spm_vocab_size = 50_000
  with pytest.raises(ValueError, match='spm_vocab_size=50000 is larger than this corpus'):
    tokenizer.load(cfg)
  assert not sources.tokenizer_path(cfg).exists()


class TinyCatalog(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Stands in for a catalog dataset (c4/en, lm1b) that the user prepared as array_record."""

  VERSION = tfds.core.Version('1.0.0')
  code_path = None

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self, features=tfds.features.FeaturesDict({'body': tfds.features.Text()})
    )

  def _split_generators(self, dl_manager):
    return {
      'train': self._generate_examples(LINES[:30]),
      'test': self._generate_examples(LINES[30:]),
    }

  def _generate_examples(self, lines):
    for i, line in enumerate(lines):
      yield i, {'body': line}


def test_catalog_dataset_prepared_by_the_user(tmp_path):
  TinyCatalog(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  cfg = config_lib.data_config()
  cfg.update(dataset='tiny_catalog', data_dir=str(tmp_path), text_field='body', eval_split='test')
  it = _iterator(
    cfg,
    split='validation',
    batch_size=2,
    seq_len=128,
    seed=0,
    shuffle=False,
    num_epochs=1,
    process_index=0,
    process_count=1,
  )
  tok = tokenizer.ByteTokenizer()
  stream = np.concatenate([b['inputs'][b['segment_ids'] > 0] for b in it])
  docs = [tok.decode(d) for d in np.split(stream, np.flatnonzero(stream == tok.bos_id))[1:]]
  assert sorted(docs) == sorted(LINES[30:])
  with pytest.raises(ValueError, match="Split 'validation' is not in 'tiny_catalog'.*test, train"):
    sources.data_source(cfg, 'validation')
  cfg.text_field = 'text'
  with pytest.raises(KeyError, match="text_field='text'.*body"):
    _iterator(cfg, split='train', batch_size=2, seq_len=8, seed=0, process_count=1)
  # A TFRecord copy cannot be read without TensorFlow: say how to convert it.
  info_path = tmp_path / 'tiny_catalog' / '1.0.0' / 'dataset_info.json'
  info = json.loads(info_path.read_text())
  info['fileFormat'] = 'tfrecord'
  info_path.write_text(json.dumps(info))
  with pytest.raises(ValueError, match='stored as tfrecord.*tfds convert_format'):
    sources.data_source(cfg, 'train')
