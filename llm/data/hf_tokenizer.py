"""Hugging Face tokenizers, read from the files of a model directory.

Three kinds of directory exist: fast tokenizers (`tokenizer.json`, run by the
`tokenizers` package exactly as transformers runs them), sentencepiece
models (`tokenizer.model`, e.g. Llama 2), and BERT WordPiece vocabularies
(`vocab.txt` only, as older BERT releases ship; built into the same fast
tokenizer that transformers' BertTokenizerFast builds from it).
`tokenizer.json` wins when several are present, as it does in transformers.
The wrappers speak the project's tokenizer protocol (`llm/data/tokenizer.py`):
`encode(text) -> list[int]`, `encode_array(text)`, `decode(ids) -> str`,
`vocab_size`, `pad_id`, `bos_id`, `eos_id`; they pickle, for grain's worker
processes.

`encode` adds no BOS/EOS by default, because the input pipeline and generation
add them explicitly; `add_special_tokens=True` gives what transformers'
`tokenizer(text)` gives. `bos_id` / `eos_id` are -1 when the tokenizer has
none. GPT-2 and Llama define no padding token; `pad_id` is then `eos_id`, as is
usual with transformers: padded positions are masked out, so any valid id does,
and a valid one keeps embedding lookups in range.

BERT-style tokenizers name no BOS/EOS but [CLS] and [SEP]: those serve as
`bos_id` / `eos_id`, so the input pipeline's [bos] text [eos] documents are
BERT's [CLS] text [SEP]. `cls_id`, `sep_id` and `mask_id` are the ids of those
tokens, None when the tokenizer has none (masked-LM data and fill-mask then use
an id past the vocabulary, as for the project's own tokenizers).
"""

import json
import os

import numpy as np
import sentencepiece
import tokenizers
from etils import epath

# Files that make up a Hugging Face tokenizer; copied as they are on import and export.
FILES = (
  'tokenizer.json',
  'tokenizer.model',
  'tokenizer_config.json',
  'special_tokens_map.json',
  'added_tokens.json',
  'vocab.json',
  'merges.txt',
  'vocab.txt',
  'chat_template.jinja',
  'generation_config.json',
)
_SPECIALS = ('bos', 'eos', 'pad', 'unk')
_BERT_SPECIALS = ('cls', 'sep', 'mask')
# BertTokenizer's defaults, which configs such as bert-base-uncased's do not repeat.
_WORDPIECE_DEFAULTS = dict(unk='[UNK]', sep='[SEP]', cls='[CLS]', pad='[PAD]', mask='[MASK]')


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _token_text(value) -> str | None:
  # tokenizer_config.json holds either the token text or an AddedToken dict.
  return value.get('content') if isinstance(value, dict) else value


def _special_ids(hf_dir: str, token_to_id, defaults: dict[str, int]) -> dict[str, int]:
  """bos/eos/pad/unk/cls/sep/mask ids (-1: none): named tokens in the tokenizer configs
  first, then config.json ids; [CLS] and [SEP] stand in for a missing BOS and EOS."""
  tok_cfg = _read_json(os.path.join(hf_dir, 'special_tokens_map.json'))
  tok_cfg.update(_read_json(os.path.join(hf_dir, 'tokenizer_config.json')))
  model_cfg = _read_json(os.path.join(hf_dir, 'config.json'))
  ids = {}
  for name in _SPECIALS + _BERT_SPECIALS:
    text = _token_text(tok_cfg.get(f'{name}_token'))
    found = token_to_id(text) if text else None
    if found is None:
      found = model_cfg.get(f'{name}_token_id')
      found = found[0] if isinstance(found, list) else found
    ids[name] = defaults.get(name, -1) if found is None else int(found)
  for name, stand_in in (('bos', 'cls'), ('eos', 'sep')):
    if ids[name] < 0:
      ids[name] = ids[stand_in]
  return ids


def _eos_ids(hf_dir: str, eos_id: int) -> tuple[int, ...]:
  """Every id that ends generation: the EOS token plus config lists (Llama 3 has several)."""
  ids = [eos_id] if eos_id >= 0 else []
  for name in ('config.json', 'generation_config.json'):
    listed = _read_json(os.path.join(hf_dir, name)).get('eos_token_id')
    for i in listed if isinstance(listed, list) else [listed]:
      if i is not None and i not in ids:
        ids.append(int(i))
  return tuple(ids)


class _Base:
  """Shared attributes; `source_dir` is where the tokenizer files are copied from."""

  def __init__(self, hf_dir: str, vocab_size: int, ids: dict[str, int]):
    self.source_dir = hf_dir
    self.vocab_size = vocab_size
    self.bos_id, self.eos_id, self.pad_id, self.unk_id = (ids[n] for n in _SPECIALS)
    self.cls_id, self.sep_id, self.mask_id = (
      ids[n] if ids[n] >= 0 else None for n in _BERT_SPECIALS
    )
    self.has_pad = self.pad_id >= 0
    if not self.has_pad:
      self.pad_id = max(self.eos_id, 0)
    self.eos_ids = _eos_ids(hf_dir, self.eos_id)

  def encode_array(self, text: str) -> np.ndarray:
    """The ids as int32, for the input pipeline."""
    return np.asarray(self.encode(text), np.int32)

  def _valid(self, ids) -> list[int]:
    # Models may have more rows than the tokenizer has tokens (padded vocabularies).
    return [int(i) for i in np.asarray(ids).reshape(-1) if 0 <= i < self.vocab_size]

  def save(self, out_dir: str) -> list[str]:
    """Copies the tokenizer files into `out_dir`; returns their names."""
    return copy_files(self.source_dir, out_dir)


class FastTokenizer(_Base):
  """A `tokenizer.json` (or a BERT `vocab.txt`), run by the `tokenizers` package."""

  def __init__(self, hf_dir: str):
    path = os.path.join(hf_dir, 'tokenizer.json')
    if os.path.exists(path):
      self._tok = tokenizers.Tokenizer.from_file(path)
    else:
      self._tok = _wordpiece_from_vocab(hf_dir)
    defaults = {}
    if isinstance(self._tok.model, tokenizers.models.WordPiece):
      found = {n: self._tok.token_to_id(t) for n, t in _WORDPIECE_DEFAULTS.items()}
      defaults = {n: i for n, i in found.items() if i is not None}
    ids = _special_ids(hf_dir, self._tok.token_to_id, defaults)
    super().__init__(hf_dir, self._tok.get_vocab_size(with_added_tokens=True), ids)
    added = self._tok.get_added_tokens_decoder()
    named = (self.bos_id, self.eos_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id)
    named += (self.pad_id,) * self.has_pad
    # Ids that are never text (masked-LM data never masks or draws them).
    self.special_ids = tuple(
      sorted(
        {i for i in named if i is not None and i >= 0} | {i for i, t in added.items() if t.special}
      )
    )

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    # Special tokens are skipped by default, as sentencepiece does. No
    # clean_up_tokenization_spaces: transformers 5 skips it for BPE, as it corrupts text.
    return self._tok.decode(self._valid(ids), skip_special_tokens=skip_special_tokens)

  def id_to_token(self, i: int) -> str | None:
    """The vocabulary entry of one id (e.g. '##ing'), None past the vocabulary."""
    return self._tok.id_to_token(int(i))


def _wordpiece_from_vocab(hf_dir: str) -> tokenizers.Tokenizer:
  """BERT's tokenizer from `vocab.txt` and tokenizer_config.json, as BertTokenizerFast builds it.

  The settings default to BertTokenizer's: lowercase, accents stripped when
  lowercasing, Chinese characters split, '##' continuations, [CLS] x [SEP].
  """
  from tokenizers import implementations  # Late: only vocab.txt directories need it.

  tok_cfg = _read_json(os.path.join(hf_dir, 'special_tokens_map.json'))
  tok_cfg.update(_read_json(os.path.join(hf_dir, 'tokenizer_config.json')))
  names = {
    f'{n}_token': _token_text(tok_cfg.get(f'{n}_token')) or default
    for n, default in _WORDPIECE_DEFAULTS.items()
  }
  bert = implementations.BertWordPieceTokenizer(
    os.path.join(hf_dir, 'vocab.txt'),
    clean_text=True,
    handle_chinese_chars=tok_cfg.get('tokenize_chinese_chars', True),
    strip_accents=tok_cfg.get('strip_accents'),
    lowercase=tok_cfg.get('do_lower_case', True),
    **names,
  )
  return bert._tokenizer  # The plain Tokenizer: it pickles, the wrapper class does not.


class SentencePieceTokenizer(_Base):
  """A sentencepiece `tokenizer.model`; BOS/EOS follow `add_bos_token` / `add_eos_token`."""

  def __init__(self, hf_dir: str):
    self._sp = sentencepiece.SentencePieceProcessor(
      model_file=os.path.join(hf_dir, 'tokenizer.model')
    )

    def token_to_id(text):
      i = self._sp.piece_to_id(text)
      return None if i == self._sp.unk_id() and text != self._sp.id_to_piece(i) else i

    defaults = dict(
      bos=self._sp.bos_id(), eos=self._sp.eos_id(), pad=self._sp.pad_id(), unk=self._sp.unk_id()
    )
    super().__init__(hf_dir, self._sp.get_piece_size(), _special_ids(hf_dir, token_to_id, defaults))
    tok_cfg = _read_json(os.path.join(hf_dir, 'tokenizer_config.json'))
    # LlamaTokenizer's defaults.
    self._add_bos = tok_cfg.get('add_bos_token', True) and self.bos_id >= 0
    self._add_eos = tok_cfg.get('add_eos_token', False) and self.eos_id >= 0

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    ids = self._sp.encode(text)
    if add_special_tokens:
      ids = [self.bos_id] * self._add_bos + ids + [self.eos_id] * self._add_eos
    return ids

  def decode(self, ids) -> str:
    # sentencepiece never renders control tokens (BOS/EOS), like skip_special_tokens=True.
    return self._sp.decode(self._valid(ids))


_TOKENIZER_FILES = ('tokenizer.json', 'tokenizer.model', 'vocab.txt')


def exists(hf_dir: str) -> bool:
  """Whether `hf_dir` holds a tokenizer that `load` reads."""
  return any(os.path.exists(os.path.join(hf_dir, n)) for n in _TOKENIZER_FILES)


def load(hf_dir: str) -> FastTokenizer | SentencePieceTokenizer:
  """The tokenizer of a Hugging Face model directory."""
  if os.path.exists(os.path.join(hf_dir, 'tokenizer.json')):
    return FastTokenizer(hf_dir)
  if os.path.exists(os.path.join(hf_dir, 'tokenizer.model')):
    return SentencePieceTokenizer(hf_dir)
  if os.path.exists(os.path.join(hf_dir, 'vocab.txt')):
    return FastTokenizer(hf_dir)
  raise FileNotFoundError(
    f'{hf_dir} has no tokenizer: expected tokenizer.json (tokenizers), tokenizer.model '
    '(sentencepiece) or vocab.txt (BERT WordPiece).'
  )


def copy_files(src_dir: str, out_dir: str) -> list[str]:
  """Copies the Hugging Face tokenizer files in `src_dir` (local or gs://); returns their names."""
  src, out = epath.Path(src_dir), epath.Path(out_dir)
  copied = [name for name in FILES if (src / name).exists()]
  if copied:
    out.mkdir(parents=True, exist_ok=True)
  for name in copied:
    (out / name).write_bytes((src / name).read_bytes())
  return copied
