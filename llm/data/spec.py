"""What to read: a `Stream` (a data config, a split, the batch shape, the order, the host), and
which kind of data a config names.

Kinds:

  synthetic       data.dataset='synthetic': random sequences, no files (synthetic.py)
  corpus          a TFDS text dataset ('shakespeare', 'text_files', a catalog
                  name): packed rows of documents for data.objective 'lm' or
                  'mlm' (pipeline.py, mlm.py)
  sft             JSON-lines prompt/response or chat examples (sft.py)
  classification  JSON-lines text and label (classification.py)

`llm/data/streams.py` builds the iterator of a stream; every kind's module
reads its settings from here, so the batch shape and host layout are spelt once.
"""

import dataclasses

import jax

FINETUNE = ('sft', 'classification')


def kind(data_config) -> str:
  """The kind of `data.dataset` (see the module docstring)."""
  name = data_config.dataset
  return name if name in ('synthetic', *FINETUNE) else 'corpus'


@dataclasses.dataclass(frozen=True)
class Stream:
  """What to read.

  split: 'train' and 'validation' mean data.train_split / data.eval_split
    (fine-tuning: data.train_files / data.eval_files); any other value is a
    TFDS split name. batch_size: global rows per batch, of seq_len tokens.
    shuffle: False reads in stored order (evaluation). num_epochs: None
    repeats forever, else StopIteration after that many. process_index,
    process_count: the host, default jax's. prepare: build a missing dataset
    and train its missing tokenizer (training does; evaluation never does: it
    would read other text or other ids than the model was trained on).
  """

  data: object  # config.data
  split: str
  batch_size: int
  seq_len: int
  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = None
  process_index: int | None = None
  process_count: int | None = None
  prepare: bool = True

  def __post_init__(self):
    if self.process_index is None:
      object.__setattr__(self, 'process_index', jax.process_index())
    if self.process_count is None:
      object.__setattr__(self, 'process_count', jax.process_count())
    if not isinstance(self.seq_len, int) or self.seq_len <= 0:
      raise ValueError(f'seq_len={self.seq_len!r} must be a positive number of tokens.')
    if not isinstance(self.batch_size, int) or self.batch_size <= 0:
      raise ValueError(f'batch_size={self.batch_size!r} must be a positive number of rows.')
    if self.batch_size % self.process_count:
      raise ValueError(
        f'batch_size={self.batch_size} is not divisible by the number of hosts '
        f'({self.process_count}).'
      )
    if self.num_epochs is not None and self.num_epochs <= 0:
      raise ValueError(f'num_epochs={self.num_epochs} must be positive, or None to repeat forever.')

  @classmethod
  def of(cls, config, split: str, *, num_epochs=None, batch_size=0, seq_len=0) -> 'Stream':
    """The stream of `split` for an experiment config: training shuffles, other splits do not."""
    return cls(
      config.data,
      split,
      batch_size or config.batch_size,
      seq_len or config.seq_len,
      seed=config.seed,
      shuffle=split == 'train',
      num_epochs=num_epochs,
    )

  @property
  def rows(self) -> int:
    """This host's rows of each batch."""
    return self.batch_size // self.process_count

  @property
  def whole(self) -> bool:
    """Whether every host reads the whole split (a finite stream on several hosts).

    Hosts reading only their slices of a finite split would run out after
    different numbers of batches, and the first to stop would leave the
    others waiting forever in the collective eval step; so each reads it all
    and keeps its rows of every global batch.
    """
    return self.num_epochs is not None and self.process_count > 1

  def state_keys(self) -> dict:
    """What an iterator's saved state must agree on to continue the same stream."""
    return dict(
      dataset=self.data.dataset,
      split=self.split,
      seed=self.seed,
      shuffle=self.shuffle,
      batch_size=self.batch_size,
      seq_len=self.seq_len,
      process_index=self.process_index,
      process_count=self.process_count,
    )
