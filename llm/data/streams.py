"""The one place that builds a stream's batches, whatever kind of data it names.

Training, evaluation during training and `python -m llm.evaluate` all come
here, so "what kind of dataset is this" is decided once (`spec.kind`; the
kinds are listed in llm/data/spec.py). Every iterator yields this host's rows
of each global batch as numpy arrays and has `get_state` / `set_state` for
checkpoints.
"""

from llm.config import ModelConfig
from llm.data import mlm, synthetic, tokenizer
from llm.data.spec import FINETUNE, Stream, kind

__all__ = ['FINETUNE', 'Stream', 'check', 'eval_options', 'kind', 'make_iterator', 'tokenizer_of']


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
