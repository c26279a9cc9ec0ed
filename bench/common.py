"""What the benchmarks share: a random batch in the train step's layout, and alternated timing."""

import statistics
import time

import numpy as np


def random_batch(vocab_size: int, batch: int, seq_len: int, seed: int = 0) -> dict:
  """Rows of random tokens, one document each, every position counted: the step's input."""
  tokens = np.random.default_rng(seed).integers(0, vocab_size, (batch, seq_len + 1), np.int32)
  return {
    'inputs': tokens[:, :-1],
    'targets': tokens[:, 1:],
    'segment_ids': np.ones((batch, seq_len), np.int32),
    'positions': np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy(),
    'loss_mask': np.ones((batch, seq_len), np.float32),
  }


def alternate(steps: dict, n_warmup: int = 2, n: int = 6) -> dict:
  """Median seconds per call of each step function, calling them in turn.

  Taking turns spreads the load of other processes over every contender alike.
  """
  for _ in range(n_warmup):
    for step in steps.values():
      step()
  times = {name: [] for name in steps}
  for _ in range(n):
    for name, step in steps.items():
      t = time.perf_counter()
      step()
      times[name].append(time.perf_counter() - t)
  return {name: statistics.median(t) for name, t in times.items()}
