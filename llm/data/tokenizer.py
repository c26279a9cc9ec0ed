"""Text <-> token ids: raw bytes, or a sentencepiece model trained on the corpus.

Both tokenizers share the special ids, so code that pads, starts or stops a
sequence never needs to know which one it has:

  0  pad  fills rows after the last document; never a target (loss mask 0).
  1  bos  the first input of every document.
  2  eos  the last target of every document; generation stops on it.
  3  unk  sentencepiece only; byte fallback means encoding never produces it.

`'byte'` needs no training: byte b is id b + 3, so vocab_size is 259.

A sentencepiece model is trained with no normalisation, no added or removed
whitespace and byte fallback, so `decode(encode(text)) == text` for any string:
newlines, tabs, runs of spaces, code and any Unicode. Its pieces are the four
ids above, then '\\n' (4) and '\\t' (5) as whole pieces (so that lines and
indentation are cheap), the 256 byte pieces (6..261), then the learned pieces.

A directory of Hugging Face tokenizer files (an imported model's) gives
`llm.convert.tokenizer`'s wrappers instead, with that tokenizer's own special
ids (BERT: bos = [CLS], eos = [SEP], pad = [PAD], and a `mask_id`).
"""

import io
import re

import numpy as np
import sentencepiece as spm
import tqdm
from absl import logging
from etils import epath

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
_BYTE_OFFSET = 3

# Lines longer than this many bytes are not used to learn pieces (they still
# encode fine); sentencepiece's default of 4192 would silently drop long
# paragraphs of web text.
_MAX_TRAINING_LINE_BYTES = 1 << 14


class ByteTokenizer:
  """UTF-8 bytes, shifted past the special ids; nothing to train or store."""

  vocab_size = 256 + _BYTE_OFFSET
  pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

  def encode(self, text: str) -> list[int]:
    return self.encode_array(text).tolist()

  def encode_array(self, text: str) -> np.ndarray:
    """The ids as int32 without a Python list: the pipeline's hot path."""
    data = np.frombuffer(text.encode('utf-8'), np.uint8)
    return data.astype(np.int32) + _BYTE_OFFSET

  def decode(self, ids) -> str:
    ids = np.asarray(ids, np.int64).reshape(-1)
    data = ids[(ids >= _BYTE_OFFSET) & (ids < self.vocab_size)] - _BYTE_OFFSET
    return data.astype(np.uint8).tobytes().decode('utf-8', errors='replace')


class SentencePieceTokenizer:
  """A trained sentencepiece model; pickles as its serialized proto (for grain workers)."""

  def __init__(self, model_proto: bytes):
    self._proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._sp.vocab_size()
    self.pad_id, self.bos_id, self.eos_id = PAD_ID, BOS_ID, EOS_ID
    found = (self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id())
    if found != (PAD_ID, BOS_ID, EOS_ID):
      raise ValueError(
        f'The sentencepiece model has pad/bos/eos ids {found}, not {PAD_ID, BOS_ID, EOS_ID}; '
        'train it with `python -m llm.data.prepare` or import it with matching ids.'
      )

  def __getstate__(self):
    return {'model_proto': self._proto}

  def __setstate__(self, state):
    self.__init__(state['model_proto'])

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_array(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), np.int32)

  def decode(self, ids) -> str:
    ids = [int(i) for i in np.asarray(ids).reshape(-1) if 0 <= i < self.vocab_size]
    return self._sp.decode(ids)

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(i)


Tokenizer = ByteTokenizer | SentencePieceTokenizer


def train_sentencepiece(
  lines, *, vocab_size: int, model_type: str, max_lines: int
) -> SentencePieceTokenizer:
  """Learns a model from an iterable of lines (newlines are pieces of their own).

  Raises ValueError naming the vocab size that the text supports when
  `vocab_size` is out of range.
  """
  if model_type not in ('bpe', 'unigram'):
    raise ValueError(f"data.spm_model_type={model_type!r} is not one of 'bpe', 'unigram'.")
  if vocab_size <= 0:
    raise ValueError(f'data.spm_vocab_size={vocab_size} must be positive.')

  def counted_lines():
    n = 0
    for line in tqdm.tqdm(lines, desc='Reading text for the tokenizer', unit=' lines'):
      if line:
        n += 1
        yield line
        if n >= max_lines:
          return
    if n == 0:
      raise ValueError('The training text of the tokenizer is empty.')

  model = io.BytesIO()
  logging.info('Training a %s sentencepiece model with %d pieces.', model_type, vocab_size)
  try:
    spm.SentencePieceTrainer.train(
      sentence_iterator=counted_lines(),
      model_writer=model,
      model_type=model_type,
      vocab_size=vocab_size,
      normalization_rule_name='identity',
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      byte_fallback=True,
      allow_whitespace_only_pieces=True,
      split_digits=True,
      user_defined_symbols=['\n', '\t'],
      pad_id=PAD_ID,
      bos_id=BOS_ID,
      eos_id=EOS_ID,
      unk_id=UNK_ID,
      character_coverage=0.9995,
      max_sentence_length=_MAX_TRAINING_LINE_BYTES,
      input_sentence_size=max_lines,
      shuffle_input_sentence=True,
      num_threads=4,
      minloglevel=2,
    )
  except RuntimeError as e:
    raise ValueError(_explain_training_error(str(e), vocab_size)) from None
  return SentencePieceTokenizer(model.getvalue())


def _explain_training_error(message: str, vocab_size: int) -> str:
  too_high = re.search(r'value <= (\d+)', message)
  if too_high:
    return (
      f'data.spm_vocab_size={vocab_size} is larger than this corpus supports; '
      f'set it to at most {too_high.group(1)}.'
    )
  too_low = re.search(r'smaller than required_chars\. \d+ vs (\d+)', message)
  if too_low:
    return (
      f'data.spm_vocab_size={vocab_size} cannot hold the special ids, the 256 byte pieces '
      f'and the characters of this corpus; set it to at least {too_low.group(1)}.'
    )
  return f'Training the sentencepiece model failed: {message.strip()}'


def save(tok: SentencePieceTokenizer, path: epath.Path) -> None:
  """Writes beside `path` then renames, so a crash never leaves a truncated model."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + '.incomplete')
  tmp.write_bytes(tok.__getstate__()['model_proto'])
  tmp.rename(path)


def load(data_config) -> Tokenizer:
  """The tokenizer `data_config.tokenizer` names, training it first if it is missing.

  'byte': the byte tokenizer. A path: that sentencepiece model. Empty: the
  model trained on (and stored with) the prepared dataset, trained now if absent.
  A directory: the Hugging Face tokenizer in it (tokenizer.json, tokenizer.model
  or a BERT vocab.txt), or in its `tokenizer/` (a `python -m llm.convert import`
  output), for fine-tuning an imported model on the ids it was trained with.
  """
  choice = data_config.tokenizer
  if choice == 'byte':
    return ByteTokenizer()
  if choice:
    path = epath.Path(choice)
    if not path.exists():
      raise FileNotFoundError(
        f"data.tokenizer={choice!r} does not exist; give a sentencepiece .model file, 'byte', "
        "a Hugging Face tokenizer directory, or '' for the model trained on the dataset."
      )
    if path.is_dir():
      return _hf_tokenizer(choice)
    return SentencePieceTokenizer(path.read_bytes())
  from llm.data import sources  # Late: sources imports TFDS, which 'byte' users never need.

  path = sources.tokenizer_path(data_config)
  if not path.exists():
    train(data_config)
  return SentencePieceTokenizer(path.read_bytes())


def _hf_tokenizer(directory: str):
  """A Hugging Face tokenizer with the ids the pipeline frames documents with."""
  from llm.convert import tokenizer as hf_tokenizer  # Late: only imported models need it.

  if not hf_tokenizer.exists(directory) and hf_tokenizer.exists(f'{directory}/tokenizer'):
    directory = f'{directory}/tokenizer'
  tok = hf_tokenizer.load(directory)
  missing = [n.upper() for n in ('bos', 'eos') if getattr(tok, f'{n}_id') < 0]
  if missing:
    raise ValueError(
      f'data.tokenizer={directory!r} defines no {" and no ".join(missing)} token '
      '(nor [CLS] / [SEP]), which the input pipeline starts and ends every document with.'
    )
  return tok


def train(data_config, *, overwrite: bool = False) -> epath.Path:
  """Trains the dataset's sentencepiece model, preparing the dataset if needed; returns its path."""
  from llm.data import sources

  path = sources.tokenizer_path(data_config)
  if path.exists() and not overwrite:
    return path
  source = sources.data_source(data_config, data_config.train_split)
  field = sources.text_feature(data_config)

  def lines():
    for i in range(len(source)):
      yield from sources.record_text(source[i], field).split('\n')

  tok = train_sentencepiece(
    lines(),
    vocab_size=data_config.spm_vocab_size,
    model_type=data_config.spm_model_type,
    max_lines=data_config.spm_max_lines,
  )
  save(tok, path)
  logging.info('Wrote the tokenizer to %s.', path)
  return path
