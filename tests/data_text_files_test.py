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


def test_pattern_matching_nothing_says_nothing_was_prepared_from_it(tmp_path):
  cfg = config(tmp_path, 'gone/*.txt')
  with pytest.raises(
    FileNotFoundError, match=r"gone/\*.txt' matches no files and data.data_dir=.* holds nothing"
  ):
    sources.data_source(cfg, 'train', allow_prepare=False)


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
  fingerprint = streams.identity(cfg)['tokenizer']
  assert fingerprint.startswith('sentencepiece sha256:')
  cfg_copy = config_lib.data_config()  # The same model read from another path is the same.
  cfg_copy.tokenizer = str(tmp_path / 'copy.model')
  tokenizer.save(tok, epath.Path(cfg_copy.tokenizer))
  assert tokenizer.fingerprint(tokenizer.load(cfg_copy)) == fingerprint
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
  with pytest.raises(ValueError, match="text_field='text'.*body"):
    _iterator(cfg, split='train', batch_size=2, seq_len=8, seed=0, process_count=1)
  # A TFRecord copy cannot be read without TensorFlow: say how to convert it.
  info_path = tmp_path / 'tiny_catalog' / '1.0.0' / 'dataset_info.json'
  info = json.loads(info_path.read_text())
  info['fileFormat'] = 'tfrecord'
  info_path.write_text(json.dumps(info))
  with pytest.raises(ValueError, match='stored as tfrecord.*tfds convert_format'):
    sources.data_source(cfg, 'train')


# ----------------------------------------------------------------------------
# A changed corpus, the identity of what a run reads, what preparation skipped.


def _lines_corpus(root, n_files):
  for i in range(n_files):
    write(root / f'part{i}.txt', '\n'.join(f'{line} (part {i})' for line in LINES[:10]).encode())
  return root


def _documents(b):
  return sum(s.num_examples for s in b.info.splits.values())


def test_changed_corpus_is_prepared_again_into_its_own_directory(tmp_path, capsys):
  root = _lines_corpus(tmp_path / 'corpus', 2)
  cfg = config(root, '*.txt', text_unit='line', data_dir=str(tmp_path / 'data'))
  first = sources.prepare(cfg)
  info = epath.Path(first.data_dir, 'dataset_info.json')
  stamp = info.stat().mtime, len(list(epath.Path(first.data_dir).iterdir()))
  capsys.readouterr()
  again = sources.prepare(cfg)  # Unchanged files: the same directory, not prepared again.
  assert again.data_dir == first.data_dir and (info.stat().mtime, stamp[1]) == stamp
  assert 'changed' not in capsys.readouterr().out
  before, tokenizer_before = streams.identity(cfg), sources.tokenizer_path(cfg)

  write(root / 'part9.txt', b'one more line\nand another')
  grown = sources.prepare(cfg)
  assert grown.data_dir != first.data_dir and _documents(grown) == _documents(first) + 2
  assert (
    'data.text_files changed since it was prepared (1 file added, 0 modified, 0 removed): '
    f'preparing it again into {grown.data_dir}.\n'
  ) in capsys.readouterr().out
  assert sources.tokenizer_path(cfg) != tokenizer_before  # It trains its own tokenizer.
  change = streams.describe_change(before, streams.identity(cfg))
  assert change.startswith('data.text_files now matches other files (text_files/')
  assert 'the prepared dataset holds other documents (train ' in change

  write(root / 'part0.txt', b'rewritten')
  (root / 'part1.txt').unlink()
  sources.prepare(cfg)
  assert '(0 files added, 1 modified, 1 removed)' in capsys.readouterr().out


def test_corpus_whose_files_are_gone_is_read_from_its_preparation(tmp_path, capsys):
  root = _lines_corpus(tmp_path / 'corpus', 2)
  cfg = config(root, '*.txt', text_unit='line', data_dir=str(tmp_path / 'data'))
  texts = prepared_texts(cfg, 'train')
  for path in root.iterdir():
    path.unlink()
  capsys.readouterr()
  assert prepared_texts(cfg, 'train') == texts
  assert prepared_texts(cfg, 'train') == texts
  out = capsys.readouterr().out
  assert out.count('matches no files now; reading the dataset prepared from it before') == 1
  with pytest.raises(FileNotFoundError, match='matches no files'):
    sources.prepare(cfg, overwrite=True)  # Never deletes the only copy.
  assert prepared_texts(cfg, 'train') == texts


def test_reading_a_changed_corpus_without_preparing_says_what_changed(tmp_path):
  root = _lines_corpus(tmp_path / 'corpus', 2)
  cfg = config(root, '*.txt', text_unit='line', data_dir=str(tmp_path / 'data'))
  sources.prepare(cfg)
  write(root / 'part7.txt', b'new')
  with pytest.raises(
    FileNotFoundError, match=r'changed since it was prepared \(1 file added.*llm.data.prepare'
  ):
    sources.data_source(cfg, 'train', allow_prepare=False)


def test_identity_names_the_prepared_data_wherever_data_dir_is(tmp_path):
  root = _lines_corpus(tmp_path / 'corpus', 2)
  cfg = config(root, '*.txt', text_unit='line', data_dir=str(tmp_path / 'a'))
  unprepared = streams.identity(cfg)  # Prepares nothing.
  assert 'documents' not in unprepared and not list(tmp_path.glob('a/**/dataset_info.json'))
  sources.prepare(cfg)
  identity = streams.identity(cfg)
  assert identity['prepared'] == f'text_files/{unprepared["prepared"].split("/")[1]}/1.0.0'
  assert identity['tokenizer'] == 'byte' and identity['split'] == 'train'
  assert json.loads(json.dumps(identity)) == identity
  (tmp_path / 'a').rename(tmp_path / 'b')  # The same data mounted elsewhere.
  moved = config(root, '*.txt', text_unit='line', data_dir=str(tmp_path / 'b'))
  assert streams.identity(moved) == identity
  assert streams.describe_change(identity, streams.identity(moved)) == ''


def test_identity_never_trains_the_tokenizer(tmp_path):
  root = _lines_corpus(tmp_path / 'corpus', 2)
  cfg = config(root, '*.txt', text_unit='line', data_dir=str(tmp_path / 'data'), tokenizer='')
  sources.prepare(cfg)
  with pytest.raises(FileNotFoundError, match='tokenizer .* does not exist'):
    streams.identity(cfg)
  assert not sources.tokenizer_path(cfg).exists()


def test_skipped_report_is_read_back_from_the_prepared_dataset(corpus, tmp_path):
  jsonl = config(corpus, '*.jsonl*', data_dir=str(tmp_path / 'data'))
  sources.prepare(jsonl)
  report = streams.skipped_report(jsonl)  # From a new builder: what was stored.
  assert report.startswith('data: skipped 3 records of data.text_files (')
  assert all(f'{k}=1' in report for k in ('not_json', 'missing_field', 'field_not_text'))
  assert report.endswith('; see `python -m llm.data.prepare` for examples.')
  lines = config(corpus, '**/*.txt*', text_unit='line', data_dir=str(tmp_path / 'data'))
  sources.prepare(lines)
  assert streams.skipped_report(lines) == (
    'data: skipped 2 files of data.text_files (empty_files=1, binary_files=1) and read 1 '
    'document with invalid UTF-8 as replacement characters; see `python -m llm.data.prepare` '
    'for examples.'
  )
  clean = config(corpus, 'a.txt', text_unit='line', data_dir=str(tmp_path / 'data'))
  sources.prepare(clean)
  assert streams.skipped_report(clean) == ''


@pytest.mark.parametrize('given', ['corpus', 'corpus/'])
def test_a_directory_is_not_a_glob(tmp_path, monkeypatch, given):
  _lines_corpus(tmp_path / 'corpus', 1)
  monkeypatch.chdir(tmp_path)
  cfg = config(tmp_path, 'x', data_dir=str(tmp_path / 'data'))
  cfg.text_files = given
  with pytest.raises(
    ValueError, match=rf"text_files='{given}' is a directory.*'corpus/\*.txt'.*'corpus/\*\*/\*.txt'"
  ):
    sources.prepare(cfg)


@pytest.mark.parametrize(
  'typo, meant',
  [('shakespear', 'shakespeare'), ('text_file', 'text_files'), ('synthetc', 'synthetic')]
  + [('stf', 'sft'), ('clasification', 'classification'), ('tiny_catalg', 'tiny_catalog')],
)
def test_misspelt_dataset_suggests_the_name_meant(tmp_path, typo, meant):
  TinyCatalog(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  cfg = config_lib.data_config()
  cfg.update(dataset=typo, data_dir=str(tmp_path))
  with pytest.raises(ValueError, match=f"dataset='{typo}' is neither built in .* mean '{meant}'"):
    # Before the model's too small vocabulary: the dataset is the first thing to fix.
    _iterator(cfg, split='train', batch_size=2, seq_len=8, seed=0, process_count=1, vocab_size=64)


def test_finetuning_datasets_have_nothing_to_prepare(tmp_path):
  cfg = config_lib.data_config()
  cfg.update(dataset='sft', data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="dataset='sft' reads data.train_files .* no prepared"):
    sources.prepare(cfg)


@pytest.mark.parametrize(
  'overrides, message',
  [
    (dict(spm_vocab_size=0), r'data.spm_vocab_size=0 must be a positive number'),
    (dict(spm_max_lines=-1), r'data.spm_max_lines=-1 must be a positive number'),
    (dict(spm_model_type='word'), r"data.spm_model_type='word' is not one of"),
    (dict(objective='mlm', mlm_probability=1.5), r'data.mlm_probability=1.5 must be in'),
    (dict(objective='mlm', mlm_random_fraction=-0.1), r'data.mlm_random_fraction=-0.1 must be'),
    (dict(read_threads=-1), r'data.read_threads=-1 must be a whole number >= 0'),
    (dict(prefetch_batches=-2), r'data.prefetch_batches=-2 must be a whole number >= 0'),
    (dict(worker_count=-1), r'data.worker_count=-1 must be a whole number >= 0'),
    (dict(validation_fraction=0.0), r'data.validation_fraction=0.0 must be between 0 and 1'),
    (dict(spm_vocab_size=600), r'model.vocab_size=512 is smaller than data.spm_vocab_size=600'),
  ],
)
def test_bad_data_settings_stop_before_anything_is_prepared(corpus, tmp_path, overrides, message):
  cfg = config(corpus, 'a.txt', data_dir=str(tmp_path / 'data'), tokenizer='', spm_vocab_size=300)
  cfg.update(overrides)
  with pytest.raises(ValueError, match=message):
    _iterator(cfg, split='train', batch_size=2, seq_len=8, seed=0, process_count=1, vocab_size=512)
  assert not list(tmp_path.glob('data/**/dataset_info.json'))
