"""Tokenizer import: the same ids as the original tokenizer on awkward strings.

References (tests/fixtures/hf/tokenizer_cases.json, from tests/make_hf_fixtures.py):
the GPT-2 fixture's ids are transformers' `AutoTokenizer` on its tokenizer.json;
the Llama fixture's are sentencepiece's on its tokenizer.model (Llama's original
tokenizer; transformers 5 departs from it on leading whitespace, see the
fixture's 'transformers_differs').
"""

import json
import os
import pickle

import numpy as np
import pytest

from llm.convert import hf
from llm.data import hf_tokenizer as tokenizer_lib

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'hf')

with open(os.path.join(FIXTURES, 'tokenizer_cases.json')) as f:
  CASES = json.load(f)


@pytest.mark.parametrize('name', ['gpt2', 'llama'])
def test_ids_match_reference(name):
  tok = hf.load_tokenizer(os.path.join(FIXTURES, name))
  want = CASES[name]
  for i, text in enumerate(CASES['strings']):
    assert tok.encode(text) == want['ids'][i], repr(text)
    assert tok.encode(text, add_special_tokens=True) == want['ids_with_special'][i], repr(text)
    assert tok.decode(want['ids'][i]) == want['decoded'][i], repr(text)
    if 'decoded_with_special' in want:
      got = tok.decode(want['ids'][i], skip_special_tokens=False)
      assert got == want['decoded_with_special'][i], repr(text)


def test_byte_level_round_trip_is_lossless():
  tok = hf.load_tokenizer(os.path.join(FIXTURES, 'gpt2'))
  for text in CASES['strings']:
    if '<|endoftext|>' not in text:
      assert tok.decode(tok.encode(text)) == text


def test_special_ids():
  gpt2 = hf.load_tokenizer(os.path.join(FIXTURES, 'gpt2'))
  assert isinstance(gpt2, tokenizer_lib.FastTokenizer)
  assert (gpt2.vocab_size, gpt2.bos_id, gpt2.eos_id, gpt2.pad_id) == (384, 0, 0, 0)
  llama = hf.load_tokenizer(os.path.join(FIXTURES, 'llama'))
  assert isinstance(llama, tokenizer_lib.SentencePieceTokenizer)
  # No padding token: pad_id falls back to eos_id, a valid embedding row.
  assert (llama.vocab_size, llama.bos_id, llama.eos_id, llama.pad_id) == (400, 1, 2, 2)
  assert llama.eos_ids == (2,) and not llama.has_pad


@pytest.mark.parametrize('name', ['gpt2', 'llama'])
def test_pipeline_protocol(name):
  """What the input pipeline needs: int32 arrays, pickling (grain workers), safe decode."""
  tok = hf.load_tokenizer(os.path.join(FIXTURES, name))
  text = CASES['strings'][8]
  again = pickle.loads(pickle.dumps(tok))
  np.testing.assert_array_equal(again.encode_array(text), np.asarray(tok.encode(text), np.int32))
  assert again.encode_array(text).dtype == np.int32
  # Ids past the tokenizer's vocabulary (a padded model vocabulary) are dropped.
  assert tok.decode([*tok.encode(text), tok.vocab_size + 5]) == text


def test_save_copies_files_and_keeps_ids(tmp_path):
  tok = hf.load_tokenizer(os.path.join(FIXTURES, 'llama'))
  copied = hf.save_tokenizer(tok, str(tmp_path))
  assert {'tokenizer.model', 'tokenizer_config.json'} <= set(copied)
  again = hf.load_tokenizer(str(tmp_path))
  assert [again.encode(s) for s in CASES['strings']] == CASES['llama']['ids']


def test_missing_tokenizer_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='tokenizer.json.*tokenizer.model'):
    hf.load_tokenizer(str(tmp_path))
