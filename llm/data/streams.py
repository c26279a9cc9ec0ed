"""The one place that builds a stream's batches, whatever kind of data it names.

Training, evaluation during training and `python -m llm.evaluate` all come
here, so "what kind of dataset is this" is decided once (`spec.kind`; the
kinds are listed in llm/data/spec.py). Every iterator yields this host's rows
of each global batch as numpy arrays and has `get_state` / `set_state` for
checkpoints. A checkpoint also names the data it was trained on (`identity`),
so that a run resumed on other data is told how it differs (`describe_change`);
`skipped_report` is what training says at start-up about records the
preparation of its data left out.
"""

from llm.config import ModelConfig
from llm.data import mlm, synthetic, tokenizer
from llm.data.spec import FINETUNE, Stream, kind

__all__ = [
  'FINETUNE',
  'Stream',
  'check',
  'describe_change',
  'eval_options',
  'identity',
  'kind',
  'make_iterator',
  'skipped_report',
  'tokenizer_of',
]


def check(data_config, model_cfg: ModelConfig) -> None:
  """Stops, before anything is read, when the model cannot learn this data."""
  objective = mlm.objective(data_config)
  k = kind(data_config)
  if k in FINETUNE and objective != 'lm':
    raise ValueError(
      f'data.objective={objective!r} applies to pretraining corpora; data.dataset='
      f"{data_config.dataset!r} has its own targets: leave data.objective='lm'."
    )
  if k == 'sft' and (model_cfg.head != 'lm' or not model_cfg.causal):
    raise ValueError(
      "data.dataset='sft' trains next-token prediction: it needs model.head='lm' and "
      f'model.causal=True, not head={model_cfg.head!r}, causal={model_cfg.causal}.'
    )
  if objective == 'mlm' and data_config.tokenizer:
    # The [MASK] row is the objective's need, known from a given tokenizer before any data.
    mlm.check_vocab(model_cfg.vocab_size, mlm.settings(data_config, tokenizer.load(data_config)))
  if k == 'classification':
    from llm.data import classification

    names = classification.label_names(data_config)
    if model_cfg.head != 'classifier':
      raise ValueError(
        f"data.dataset='classification' needs model.head='classifier' (not "
        f'{model_cfg.head!r}) and model.num_labels={len(names)}, the number of data.labels.'
      )
    classification.check_num_labels(data_config, model_cfg.num_labels)


def make_iterator(stream: Stream, model_cfg: ModelConfig | None = None):
  """This host's batches of `stream`, after checking that `model_cfg` (if given) can learn them."""
  if model_cfg is not None:
    check(stream.data, model_cfg)
  vocab_size = None if model_cfg is None else model_cfg.vocab_size
  k = kind(stream.data)
  if k == 'synthetic':
    if vocab_size is None:
      raise ValueError("data.dataset='synthetic' needs the model config for its vocabulary.")
    return synthetic.SyntheticIterator(
      vocab_size=vocab_size,
      batch_size=stream.batch_size,
      seq_len=stream.seq_len,
      seed=stream.seed,
      num_sequences=stream.data.synthetic_num_sequences,
      split=stream.split,
      process_index=stream.process_index,
      process_count=stream.process_count,
    )
  # Late: grain and TFDS are slow to import and the synthetic stream needs neither.
  if k == 'sft':
    from llm.data import sft

    return sft.make_iterator(stream, vocab_size=vocab_size)
  if k == 'classification':
    from llm.data import classification

    kw = {}
    if model_cfg is not None:
      kw = dict(causal=model_cfg.causal, token_types=model_cfg.type_vocab_size > 0)
    return classification.make_iterator(stream, vocab_size=vocab_size, **kw)
  from llm.data import pipeline

  return pipeline.make_iterator(stream, vocab_size=vocab_size)


def tokenizer_of(data_config, *, train_if_missing: bool = True):
  """The tokenizer a run on `data_config` trains with; None for the synthetic stream without one."""
  if kind(data_config) == 'synthetic' and not data_config.tokenizer:
    return None
  return tokenizer.load(data_config, train_if_missing=train_if_missing)


def eval_options(data_config, tok, vocab_size: int) -> dict:
  """What evaluation reports beyond the loss for this data (`losses.evaluate`'s keywords).

  Bits per byte where they mean something, next-token prediction of text (the
  bytes per id of the model's tokenizer `tok`); accuracy for masked LM.
  """
  objective = mlm.objective(data_config)
  text = kind(data_config) == 'corpus' and objective == 'lm' and tok is not None
  return {
    'bytes_V': tokenizer.token_bytes(tok, vocab_size) if text else None,
    'accuracy': objective == 'mlm',
  }


def identity(data_config) -> dict:
  """Which data a run on `data_config` trains on, for its checkpoints to name.

  Small, JSON-serialisable and the same on every host and machine wherever
  data_dir is mounted: the dataset; for a corpus, its prepared directory
  below data_dir (for text_files that names the files too), the train split
  and the split sizes; for fine-tuning, a digest of the train files' contents
  (and the labels); for the synthetic stream, its number of sequences; and the
  tokenizer by its content (`tokenizer.fingerprint`). It reads only what is
  there, never preparing a dataset or training a tokenizer: call it once the
  train iterator is built.
  """
  k = kind(data_config)
  out = {'dataset': data_config.dataset}
  if k == 'synthetic':
    return {**out, 'num_sequences': data_config.synthetic_num_sequences}
  if k in FINETUNE:
    from llm.data import examples

    out['train_files'] = examples.fingerprint(data_config, 'train')
    if k == 'classification':
      out['labels'] = data_config.labels
  else:
    from llm.data import sources

    out.update(sources.identity(data_config))
  out['tokenizer'] = tokenizer.fingerprint(tokenizer.load(data_config, train_if_missing=False))
  return out


_CHANGES = {
  'prepared': 'the prepared dataset is another',
  'documents': 'the prepared dataset holds other documents',
  'split': 'data.train_split changed',
  'train_files': 'data.train_files now holds other examples',
  'labels': 'data.labels changed',
  'num_sequences': 'data.synthetic_num_sequences changed',
  'tokenizer': 'the tokenizer changed',
}


def describe_change(saved: dict, current: dict) -> str:
  """'' when two `identity` dicts name the same data, else one clause on what differs.

  For example "the tokenizer changed (byte -> sentencepiece sha256:1a2b...) and
  data.text_files now matches other files (...)"; lower case and without a
  final period, to sit inside the caller's sentence.
  """
  if saved == current:
    return ''
  if saved.get('dataset') != current.get('dataset'):
    return f'data.dataset changed ({saved.get("dataset")!r} -> {current.get("dataset")!r})'
  clauses = []
  for key in [*_CHANGES, *sorted((saved.keys() | current.keys()) - _CHANGES.keys())]:
    a, b = saved.get(key), current.get(key)
    if a == b:
      continue
    what = _CHANGES.get(key, f'{key} changed')
    if key == 'prepared' and current['dataset'] == 'text_files':
      what = _text_files_change(str(a), str(b))
    if key == 'documents':
      a, b = (', '.join(f'{s} {n}' for s, n in (d or {}).items()) or 'none' for d in (a, b))
    if key in ('split', 'labels'):  # Config values, quoted as the user writes them.
      a, b = repr(a), repr(b)
    clauses.append(f'{what} ({a} -> {b})')
  if not clauses:
    return ''
  return clauses[0] if len(clauses) == 1 else ', '.join(clauses[:-1]) + ' and ' + clauses[-1]


def _text_files_change(a: str, b: str) -> str:
  # 'text_files/SETTINGS-FILES/VERSION': the same settings hash means only the files differ.
  settings = [p.split('/')[1].partition('-')[0] if p.count('/') >= 2 else p for p in (a, b)]
  if settings[0] == settings[1]:
    return 'data.text_files now matches other files'
  return 'data.text_files or how it is read (text_unit, text_field, ...) changed'


def skipped_report(data_config) -> str:
  """One line on what the data lost on the way in ('' when nothing): training prints it.

  For a text_files corpus, the records and files its preparation skipped (as
  `python -m llm.data.prepare` lists them). Fine-tuning files have no such
  line: a bad line stops the run, naming its file and line, and the examples
  `data.truncation='drop'` leaves out are counted when the files are read.
  """
  if kind(data_config) != 'corpus':
    return ''
  from llm.data import sources

  return sources.skipped_report(data_config)
