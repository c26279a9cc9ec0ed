"""Tokenizers: exact round trips, special ids, training errors, loading."""

import pathlib
import pickle

import pytest

from llm import config as config_lib
from llm.data import tokenizer

AWKWARD = [
  '',
  ' ',
  '\n',
  'two  spaces,   three, \t tab\n\n\nthree newlines\r\nCRLF',
  '    def f(x):\n\treturn {"a": [x ** 2, None]}  # comment\n',
  'naïve café, Ærøskøbing, 東京, Привет, 🙂👍🏽, e\u0301 (combining), \u200b (zero width)',
  '\x00\x01 control \x7f characters',
  'trailing spaces   \n   leading spaces',
]

CORPUS = [
  'From fairest creatures we desire increase,',
  "That thereby beauty's rose might never die,",
  'But as the riper should by time decease,',
  'His tender heir might bear his memory:',
  '  for i in range(10):\n    print(i)',
] * 20


@pytest.fixture(scope='module')
def spm_tok():
  return tokenizer.train_sentencepiece(CORPUS, vocab_size=320, model_type='bpe', max_lines=1000)


@pytest.mark.parametrize('text', AWKWARD)
def test_byte_round_trip(text):
  tok = tokenizer.ByteTokenizer()
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert all(3 <= i < tok.vocab_size for i in ids)


@pytest.mark.parametrize('text', AWKWARD)
def test_sentencepiece_round_trip(spm_tok, text):
  assert spm_tok.decode(spm_tok.encode(text)) == text


@pytest.mark.parametrize('model_type', ['bpe', 'unigram'])
def test_special_ids_are_shared(model_type):
  tok = tokenizer.train_sentencepiece(CORPUS, vocab_size=300, model_type=model_type, max_lines=1000)
  byte = tokenizer.ByteTokenizer()
  assert (
    (tok.pad_id, tok.bos_id, tok.eos_id) == (byte.pad_id, byte.bos_id, byte.eos_id) == (0, 1, 2)
  )
  assert tok.vocab_size == 300 and byte.vocab_size == 259
  assert tok.id_to_piece(4) == '\n' and tok.id_to_piece(5) == '\t'


def test_decode_skips_special_ids(spm_tok):
  ids = spm_tok.encode('hello world')
  assert spm_tok.decode([1, *ids, 2, 0, 0]) == 'hello world'
  assert tokenizer.ByteTokenizer().decode([1, 107, 108, 2, 0]) == 'hi'


def test_pickles_for_worker_processes(spm_tok):
  clone = pickle.loads(pickle.dumps(spm_tok))
  assert clone.encode(AWKWARD[4]) == spm_tok.encode(AWKWARD[4])


def test_vocab_larger_than_corpus_supports():
  with pytest.raises(ValueError, match=r'spm_vocab_size=5000 is larger .* at most \d+'):
    tokenizer.train_sentencepiece(CORPUS, vocab_size=5000, model_type='unigram', max_lines=1000)


def test_vocab_too_small_for_bytes():
  with pytest.raises(ValueError, match=r'spm_vocab_size=100 .* at least \d+'):
    tokenizer.train_sentencepiece(CORPUS, vocab_size=100, model_type='bpe', max_lines=1000)


def test_bad_model_type():
  with pytest.raises(ValueError, match="spm_model_type='wordpiece'"):
    tokenizer.train_sentencepiece(CORPUS, vocab_size=300, model_type='wordpiece', max_lines=10)


def test_empty_training_text():
  with pytest.raises(ValueError, match='empty'):
    tokenizer.train_sentencepiece(['', ''], vocab_size=300, model_type='bpe', max_lines=10)


def test_load_byte_and_saved_model(spm_tok, tmp_path):
  cfg = config_lib.data_config()
  assert isinstance(tokenizer.load(cfg), tokenizer.ByteTokenizer)
  path = tmp_path / 'tok.model'
  tokenizer.save(spm_tok, path)
  cfg.tokenizer = str(path)
  loaded = tokenizer.load(cfg)
  assert loaded.encode(AWKWARD[3]) == spm_tok.encode(AWKWARD[3])
  assert [p.name for p in tmp_path.iterdir()] == ['tok.model']  # No temporary left behind.


def test_load_missing_model(tmp_path):
  cfg = config_lib.data_config()
  cfg.tokenizer = str(tmp_path / 'missing.model')
  with pytest.raises(FileNotFoundError, match='missing.model'):
    tokenizer.load(cfg)


def test_fingerprint_is_of_the_content(spm_tok, tmp_path):
  assert tokenizer.fingerprint(tokenizer.ByteTokenizer()) == 'byte'
  here = tokenizer.fingerprint(spm_tok)
  assert here.startswith('sentencepiece sha256:') and len(here) == len('sentencepiece sha256:') + 16
  tokenizer.save(spm_tok, tmp_path / 'a.model')
  cfg = config_lib.data_config()
  cfg.tokenizer = str(tmp_path / 'a.model')
  assert tokenizer.fingerprint(tokenizer.load(cfg)) == here
  other = tokenizer.train_sentencepiece(CORPUS, vocab_size=300, model_type='bpe', max_lines=1000)
  assert tokenizer.fingerprint(other) != here


HF = pathlib.Path(__file__).parent / 'fixtures' / 'hf'


def test_fingerprint_of_a_hugging_face_tokenizer_and_its_copy(tmp_path):
  cfg = config_lib.data_config()
  cfg.tokenizer = str(HF / 'gpt2')
  tok = tokenizer.load(cfg)
  tokenizer.save_dir(tok, tmp_path / 'tokenizer')
  cfg.tokenizer = str(tmp_path)  # A workdir: its tokenizer/ copy.
  copy = tokenizer.load(cfg)
  assert tokenizer.fingerprint(copy) == tokenizer.fingerprint(tok)
  assert tokenizer.fingerprint(tok).startswith('huggingface sha256:')
  cfg.tokenizer = str(HF / 'bert_tiny')
  assert tokenizer.fingerprint(tokenizer.load(cfg)) != tokenizer.fingerprint(tok)
