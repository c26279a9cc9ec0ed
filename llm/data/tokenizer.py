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
`llm/data/hf_tokenizer.py`'s wrappers instead, with that tokenizer's own
special ids (BERT: bos = [CLS], eos = [SEP], pad = [PAD], and a `mask_id`).

The tokenizer travels with the model: a training workdir and every params
export hold a copy in their `tokenizer/` directory (`save_dir`), so generation
and evaluation read it from there (`load_dir`) and never rebuild it from the
data settings, whose paths may be relative to another directory or gone.
"""

import hashlib
import io
import json
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
  check_spm(vocab_size=vocab_size, model_type=model_type, max_lines=max_lines)

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


def check_spm(*, vocab_size, model_type, max_lines) -> None:
  """Stops on sentencepiece settings no training accepts, before a dataset is prepared for it."""
  if model_type not in ('bpe', 'unigram'):
    raise ValueError(f"data.spm_model_type={model_type!r} is not one of 'bpe', 'unigram'.")
  if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
    raise ValueError(f'data.spm_vocab_size={vocab_size!r} must be a positive number of pieces.')
  if isinstance(max_lines, bool) or not isinstance(max_lines, int) or max_lines <= 0:
    raise ValueError(f'data.spm_max_lines={max_lines!r} must be a positive number of lines.')


def check_trainable(data_config, model_vocab_size: int | None = None) -> None:
  """Stops on spm_* settings that cannot give a tokenizer this model can use, before training."""
  spm = data_config.spm_vocab_size
  check_spm(
    vocab_size=spm, model_type=data_config.spm_model_type, max_lines=data_config.spm_max_lines
  )
  if model_vocab_size is not None and spm > model_vocab_size:
    raise ValueError(
      f'model.vocab_size={model_vocab_size} is smaller than data.spm_vocab_size={spm}, the '
      f"tokenizer trained on the corpus (data.tokenizer=''); set model.vocab_size >= {spm}."
    )


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


def load(data_config, *, train_if_missing: bool = True) -> Tokenizer:
  """The tokenizer `data_config.tokenizer` names, training it first if it is missing.

  'byte': the byte tokenizer. A path: that sentencepiece model. Empty: the
  model trained on (and stored with) the prepared dataset, trained now if absent
  and `train_if_missing`. A directory: a tokenizer copy (`save_dir`), or the
  Hugging Face tokenizer in it (tokenizer.json, tokenizer.model or a BERT
  vocab.txt), or either in its `tokenizer/` (a workdir, an import or export),
  for fine-tuning a model on the ids it was trained with.
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
      return _from_directory(choice)
    return SentencePieceTokenizer(path.read_bytes())
  from llm.data import sources  # Late: sources imports TFDS, which 'byte' users never need.

  path = sources.tokenizer_path(data_config)
  if not path.exists():
    if not train_if_missing:
      raise FileNotFoundError(
        f"The dataset's tokenizer {path} does not exist (data.tokenizer=''); pass the tokenizer "
        "the model was trained with: 'byte', a sentencepiece .model file or a tokenizer directory."
      )
    train(data_config)
  return SentencePieceTokenizer(path.read_bytes())


def check_fits(tok, vocab_size: int | None) -> None:
  """Stops when the model has fewer rows than the tokenizer has ids."""
  if vocab_size is not None and tok.vocab_size > vocab_size:
    raise ValueError(
      f'model.vocab_size={vocab_size} is smaller than the tokenizer '
      f'({tok.vocab_size} ids); set model.vocab_size >= {tok.vocab_size}.'
    )


def _from_directory(directory: str):
  """A tokenizer copy (a run's or an export's, or its parent) or Hugging Face tokenizer files,
  with the ids the pipeline frames documents with."""
  if not is_dir(directory) and is_dir(f'{directory}/{DIRECTORY}'):
    directory = f'{directory}/{DIRECTORY}'
  tok = load_dir(directory)
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

  check_trainable(data_config)
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


# ----------------------------------------------------------------------------
# The copy that travels with a model.

DIRECTORY = 'tokenizer'  # A workdir's or export's copy: DIR/tokenizer/.
MANIFEST = 'llm_tokenizer.json'  # Which of the project's tokenizers a copy holds.
_SPM_FILE = 'sentencepiece.model'


def save_dir(tok, directory) -> None:
  """Writes `tok` into `directory` (local or gs://) so that `load_dir` reads it back.

  The project's tokenizers get a manifest (and the sentencepiece proto);
  Hugging Face tokenizers are their files, copied. The files are written
  beside the directory and renamed into place, so a crash leaves no half copy.
  """
  from llm.data import hf_tokenizer

  directory = epath.Path(directory)
  tmp = directory.parent / f'{directory.name}.incomplete'
  if tmp.exists():
    tmp.rmtree()
  tmp.mkdir(parents=True)
  if isinstance(tok, ByteTokenizer):
    (tmp / MANIFEST).write_text(json.dumps({'kind': 'byte'}))
  elif isinstance(tok, SentencePieceTokenizer):
    (tmp / _SPM_FILE).write_bytes(tok.__getstate__()['model_proto'])
    (tmp / MANIFEST).write_text(json.dumps({'kind': 'sentencepiece', 'file': _SPM_FILE}))
  elif not hf_tokenizer.copy_files(tok.source_dir, str(tmp)):
    raise ValueError(f'The tokenizer of {tok.source_dir} has no files to copy.')
  tmp.rename(directory)


def is_dir(directory) -> bool:
  """Whether `directory` holds a tokenizer: a copy by `save_dir` or Hugging Face files."""
  from llm.data import hf_tokenizer

  path = epath.Path(directory)
  return (path / MANIFEST).exists() or (path.is_dir() and hf_tokenizer.exists(str(path)))


def load_dir(directory):
  """The tokenizer `save_dir` wrote into `directory`, or the Hugging Face files there."""
  from llm.data import hf_tokenizer

  path = epath.Path(directory)
  if not (path / MANIFEST).exists():
    return hf_tokenizer.load(str(path))
  manifest = json.loads((path / MANIFEST).read_text())
  if manifest.get('kind') == 'byte':
    return ByteTokenizer()
  if manifest.get('kind') == 'sentencepiece':
    return SentencePieceTokenizer((path / manifest['file']).read_bytes())
  raise ValueError(f'{path / MANIFEST} names an unknown tokenizer kind {manifest.get("kind")!r}.')


def fingerprint(tok) -> str:
  """Which tokenizer `tok` is, by its content: the same model read from any path is the same.

  'byte'; 'sentencepiece sha256:...' of the model; 'huggingface sha256:...' of
  the tokenizer files that travel with it (`hf_tokenizer.FILES`), so a copy in
  a workdir or export names the same tokenizer as the directory it came from.
  """
  if isinstance(tok, ByteTokenizer):
    return 'byte'
  if isinstance(tok, SentencePieceTokenizer):
    return (
      'sentencepiece sha256:' + hashlib.sha256(tok.__getstate__()['model_proto']).hexdigest()[:16]
    )
  from llm.data import hf_tokenizer

  h = hashlib.sha256()
  for name in hf_tokenizer.FILES:
    path = epath.Path(tok.source_dir, name)
    if path.exists():
      h.update(f'{name}\0'.encode())
      h.update(hashlib.sha256(path.read_bytes()).digest())
  return 'huggingface sha256:' + h.hexdigest()[:16]


def token_bytes(tokenizer, vocab_size: int) -> np.ndarray:
  """[vocab_size] int32: the UTF-8 bytes of text each id stands for (0 for special ids).

  Exact for the project's tokenizers: a byte id is one byte; a sentencepiece
  piece is its text with the whitespace mark as a space, a byte-fallback piece
  one byte. Other tokenizers: the bytes of the id decoded alone. This is what
  bits per byte divides by, so that models with different tokenizers compare
  on the same text.
  """
  table = np.zeros((vocab_size,), np.int32)
  n = min(vocab_size, tokenizer.vocab_size)
  if isinstance(tokenizer, ByteTokenizer):
    table[:n] = [1 if tokenizer.decode([i]) else 0 for i in range(n)]
    return table
  byte_piece = re.compile(r'<0x[0-9A-Fa-f]{2}>')
  for i in range(n):
    text = tokenizer.decode([i])
    if not text:
      continue  # Control ids decode to nothing.
    if hasattr(tokenizer, 'id_to_piece'):
      piece = tokenizer.id_to_piece(i)
      table[i] = 1 if byte_piece.fullmatch(piece) else len(piece.replace('\u2581', ' ').encode())
    else:
      table[i] = len(text.encode('utf-8'))
  return table
