"""Fine-tuning files: what names them, the identity a run saves, what loading leaves out."""

import json
import os

import pytest

from llm import config as config_lib
from llm.data import examples, sft, streams
from llm.model import ModelConfig


def _write(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return str(path)


def _data(dataset, train_files, **overrides):
  d = config_lib.data_config()
  d.update(dataset=dataset, tokenizer='byte', train_files=train_files, **overrides)
  return d


PAIRS = [{'prompt': f'q{i}', 'response': f'a{i}'} for i in range(4)]


@pytest.mark.parametrize('key', ['train_files', 'eval_files'])
@pytest.mark.parametrize('given', ['chats', 'chats/'])
def test_a_directory_is_not_a_glob(tmp_path, monkeypatch, key, given):
  _write(tmp_path / 'chats' / 'a.jsonl', PAIRS)
  monkeypatch.chdir(tmp_path)
  d = _data('sft', '')
  d[key] = given
  split = 'train' if key == 'train_files' else 'validation'
  with pytest.raises(
    ValueError,
    match=rf"data.{key}='{given}' is a directory.*'chats/\*.jsonl'.*'chats/\*\*/\*.jsonl'",
  ):
    examples.files(d, split)


def test_identity_is_the_content_of_the_train_files(tmp_path):
  d = _data('sft', _write(tmp_path / 'a.jsonl', PAIRS))
  identity = streams.identity(d)
  assert identity['dataset'] == 'sft' and identity['tokenizer'] == 'byte'
  assert identity['train_files'].startswith('1 file sha256:')
  assert json.loads(json.dumps(identity)) == identity
  # The same file elsewhere, written later, is the same data.
  copy = _data('sft', _write(tmp_path / 'elsewhere' / 'b.jsonl', PAIRS))
  os.utime(copy.train_files, (0, 0))
  assert streams.describe_change(identity, streams.identity(copy)) == ''
  changed = _data('sft', _write(tmp_path / 'c.jsonl', PAIRS[:3]))
  assert streams.describe_change(identity, streams.identity(changed)).startswith(
    'data.train_files now holds other examples (1 file sha256:'
  )
  assert streams.skipped_report(d) == ''


def test_identity_of_classification_names_its_labels(tmp_path):
  rows = [{'text': 'x', 'label': 'neg'}, {'text': 'y', 'label': 'pos'}]
  d = _data('classification', _write(tmp_path / 'a.jsonl', rows), labels='neg,pos')
  identity = streams.identity(d)
  d.labels = 'pos,neg'
  assert streams.describe_change(identity, streams.identity(d)) == (
    "data.labels changed ('neg,pos' -> 'pos,neg')"
  )


def test_dropped_examples_are_counted_in_one_line(tmp_path, capsys):
  rows = [*PAIRS, {'prompt': 'p' * 80, 'response': 'long'}]
  d = _data('sft', _write(tmp_path / 'a.jsonl', rows), truncation='drop')
  stream = streams.Stream(d, 'train', 4, 40, process_index=0, process_count=1)
  sft.make_iterator(stream)
  assert capsys.readouterr().out == (
    "data: left out 1 of the 5 train examples of data.train_files (data.truncation='drop': "
    'longer than seq_len=40).\n'
  )


@pytest.mark.parametrize('dataset', ['sft', 'classification'])
def test_missing_files_are_named_before_the_tokenizer_is_checked(dataset):
  d = _data(dataset, '', labels='a,b')
  head = dict(head='classifier', num_labels=2) if dataset == 'classification' else {}
  model = ModelConfig(vocab_size=64, **head)
  stream = streams.Stream(d, 'train', 4, 8, process_index=0, process_count=1)
  with pytest.raises(ValueError, match='data.train_files is empty'):
    streams.make_iterator(stream, model)
