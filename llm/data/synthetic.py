"""A learnable token stream that needs no files: the train loop's first data.

A fixed pool of random sequences (drawn once from `seed`) is sampled row by
row. A model first learns the pool's token statistics, then memorises the
sequences, so the loss falls quickly and keeps falling: enough to see that
training works, and cheap enough to be the throughput experiment's input.

Batches have the same keys, dtypes and meaning as the real pipeline's.
"""

import numpy as np


class SyntheticIterator:
  """Yields this host's rows of each global batch; its state is the step count."""

  def __init__(
    self,
    *,
    vocab_size: int,
    batch_size: int,
    seq_len: int,
    seed: int,
    num_sequences: int = 64,
    split: str = 'train',
    process_index: int = 0,
    process_count: int = 1,
  ):
    if batch_size % process_count:
      raise ValueError(
        f'batch_size={batch_size} is not divisible by the number of hosts ({process_count}).'
      )
    if seq_len <= 0:
      raise ValueError(f'seq_len={seq_len} must be positive.')
    if isinstance(num_sequences, bool) or not isinstance(num_sequences, int) or num_sequences <= 0:
      raise ValueError(
        f'data.synthetic_num_sequences={num_sequences!r} must be a positive number of '
        'sequences for the synthetic stream to repeat.'
      )
    pool_rng = np.random.default_rng(seed)
    self._pool = pool_rng.integers(0, vocab_size, (num_sequences, seq_len + 1), dtype=np.int32)
    # Validation samples other rows of the same pool: it measures the fit.
    self._seed = (seed, 0 if split == 'train' else 1)
    self._batch_size = batch_size
    self._rows = slice(
      process_index * batch_size // process_count,
      (process_index + 1) * batch_size // process_count,
    )
    self._seq_len = seq_len
    self.step = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    # Row choice depends only on (seed, step): any host, any restart, same batch.
    rng = np.random.default_rng((*self._seed, self.step))
    rows = rng.integers(0, len(self._pool), self._batch_size)[self._rows]
    self.step += 1
    seqs = self._pool[rows]
    T = self._seq_len
    shape = seqs[:, :T].shape
    return {
      'inputs': seqs[:, :T],
      'targets': seqs[:, 1:],
      'segment_ids': np.ones(shape, np.int32),
      'positions': np.broadcast_to(np.arange(T, dtype=np.int32), shape).copy(),
      'loss_mask': np.ones(shape, np.float32),
    }

  def get_state(self) -> dict:
    return {'step': self.step}

  def set_state(self, state: dict) -> None:
    self.step = int(state['step'])
