"""Fine-tuning examples: JSON-lines files read into memory, the overlong policy, the grain stream.

Supervised fine-tuning (`llm/data/sft.py`) and classification
(`llm/data/classification.py`) read small labelled files, not corpora: the
files named by `data.train_files` (split 'train') or `data.eval_files`
('validation') are read whole, every line checked and tokenized before the
first batch, so bad input stops the run at once with the file and line. The
examples then flow through grain like the pretraining stream: this host's
slice, shuffled with the seed and reshuffled every epoch, repeated, batched;
`pipeline.Iterator` gives the resumable state that goes into checkpoints.

Overlong examples (`data.truncation`), for a sequence of more than the
tokens a row holds:
  'error'  stops, naming the file, line and length (the default: nothing is
           lost without the user knowing);
  'left'   drops tokens from the start, after the leading bos: an SFT
           example loses its prompt first and keeps its response; a
           classified text keeps its end;
  'right'  drops tokens from the end: a classified text keeps its start (as
           BERT's tokenizers do); an SFT example loses the end of its last
           response (and that response's eos);
  'drop'   leaves the example out; how many were left out is printed.
"""

import glob
import hashlib

import grain
import numpy as np
from etils import epath

from llm.data import globs, jsonl, pipeline
from llm.data import tokenizer as tokenizer_lib
from llm.data.spec import Stream

TRUNCATION = ('error', 'left', 'right', 'drop')
SPLIT_KEYS = {'train': 'train_files', 'validation': 'eval_files'}


def files(data_config, split: str) -> list[epath.Path]:
  """The files of `split` ('train': data.train_files, 'validation': data.eval_files)."""
  if split not in SPLIT_KEYS:
    raise ValueError(
      f"Split {split!r} is not one of 'train', 'validation' for data.dataset="
      f'{data_config.dataset!r}, whose splits are the files in data.train_files / data.eval_files.'
    )
  key = SPLIT_KEYS[split]
  patterns = [p.strip() for p in data_config[key].split(',') if p.strip()]
  if not patterns:
    raise ValueError(f'data.{key} is empty; set it to a glob of .jsonl files.')
  found = []
  for pattern in patterns:
    globs.check_not_directory(key, pattern, '.jsonl')
    if '://' in pattern:
      root, _, rest = pattern.rpartition('/')
      matched = sorted(epath.Path(root).glob(rest)) if any(c in rest for c in '*?[') else []
      matched = matched or ([epath.Path(pattern)] if epath.Path(pattern).exists() else [])
    else:
      matched = [epath.Path(p) for p in sorted(glob.glob(pattern, recursive=True))]
    if not matched:
      raise FileNotFoundError(f'data.{key} pattern {pattern!r} matches no files.')
    found += [p for p in matched if p.is_file()]
  if not found:
    raise FileNotFoundError(f'data.{key}={data_config[key]!r} matches only directories, no files.')
  return found


def fingerprint(data_config, split: str) -> str:
  """'N files sha256:...' of the contents of `split`'s files, in the order they are read.

  By content, not by path or modification time: the files are small enough
  to read twice, and a copy on another machine is then the same data.
  """
  paths = files(data_config, split)
  h = hashlib.sha256()
  for path in paths:
    h.update(hashlib.sha256(epath.Path(path).read_bytes()).digest())
  return f'{len(paths)} file{"" if len(paths) == 1 else "s"} sha256:{h.hexdigest()[:16]}'


def check_truncation(policy: str) -> None:
  if policy not in TRUNCATION:
    raise ValueError(f'data.truncation={policy!r} is not one of {", ".join(TRUNCATION)}.')


def fit(arrays: dict, seq_len: int, policy: str, where: str, what: str, extra: int = 0):
  """One example's arrays cut to seq_len + `extra` entries per `policy`; None: drop it.

  `arrays` hold equally long 1-D arrays whose first entry (bos) 'left' keeps;
  `extra` is what a row holds beyond seq_len (1 for SFT: inputs and targets
  are the tokens shifted by one).
  """
  n, limit = len(next(iter(arrays.values()))), seq_len + extra
  if n <= limit:
    return arrays
  if policy == 'error':
    raise ValueError(
      f'{where}: {what} is {n - extra} tokens long, more than seq_len={seq_len}; raise seq_len, '
      "or set data.truncation to 'left', 'right' or 'drop'."
    )
  if policy == 'drop':
    return None
  if policy == 'left':
    return {k: np.concatenate([v[:1], v[n - limit + 1 :]]) for k, v in arrays.items()}
  return {k: v[:limit] for k, v in arrays.items()}


def load(data_config, split: str, seq_len: int, make_example) -> list[dict]:
  """Every example of `split`, by `make_example(record, 'file:line')` (None: dropped).

  Bad lines stop here, before any training; how many `data.truncation='drop'`
  left out is printed.
  """
  check_truncation(data_config.truncation)
  out, dropped = [], 0
  for where, record in jsonl.read(files(data_config, split)):
    ex = make_example(record, where)
    if ex is None:
      dropped += 1
    else:
      out.append(ex)
  if dropped:
    print(
      f'data: left out {dropped} of the {len(out) + dropped} {split} examples of '
      f"data.{SPLIT_KEYS[split]} (data.truncation='drop': longer than seq_len={seq_len}).",
      flush=True,
    )
  if not out:
    raise ValueError(f'No {split} example fits in seq_len={seq_len}.')
  return out


def batches(examples: list[dict], stream: Stream, *, pack=None, **settings) -> pipeline.Iterator:
  """A resumable iterator over batches of in-memory examples.

  `pack(iter_dataset)` turns examples into rows (SFT packs several per row);
  without it each example is a row. As for a corpus, a finite stream on
  several hosts is read whole by every host (`Stream.whole`), so all hosts
  run the same number of evaluation steps. The iterator's state is only valid
  for the same files and settings (`settings` adds any the caller's rows
  depend on).
  """
  lo, hi = pipeline.host_range(len(examples), stream, 'examples')
  ds = grain.MapDataset.source(examples).slice(slice(lo, hi))
  if stream.shuffle:
    ds = ds.shuffle(stream.seed)
  if stream.num_epochs != 1:
    ds = ds.repeat(stream.num_epochs)
  it = ds.to_iter_dataset()
  if pack is not None:
    it = pack(it)
  it = pipeline.batch_rows(it, stream)
  state_keys = dict(stream.state_keys(), files=stream.data[SPLIT_KEYS[stream.split]], **settings)
  return pipeline.Iterator(it, state_keys)


def load_tokenizer(data_config, vocab_size: int | None):
  """`data.tokenizer`, which must be given: these files have no prepared corpus to train one on."""
  if not data_config.tokenizer:
    raise ValueError(
      f'data.tokenizer is empty, but data.dataset={data_config.dataset!r} has no prepared corpus '
      "to train one on; set it to 'byte' or to the pretrained model's tokenizer."
    )
  tok = tokenizer_lib.load(data_config)
  tokenizer_lib.check_fits(tok, vocab_size)
  return tok
