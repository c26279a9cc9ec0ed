r"""Is the input pipeline ever the bottleneck? Packed tokens/s per host against the train step's.

  python bench/data_pipeline.py --config=experiments/shakespeare.py

Measures, for the experiment's batch (batch_size x seq_len, this host's rows):
  1. the pipeline alone: tokenize, pack and batch, in tokens per second;
  2. the jitted train step alone, on one batch held in memory;
  3. the train step fed by the pipeline, as training runs it (the pipeline's
     background thread competing with the step for the same cores).
The headroom is (1) / (2); (3) / (2) shows what feeding costs the step.
Prints a Markdown table row for bench/RESULTS.md.
"""

import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from llm import train  # noqa: E402
from llm.data import pipeline, streams  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', 'experiments/shakespeare.py', 'Experiment.')
_BATCHES = flags.DEFINE_integer('batches', 300, 'Batches timed for the pipeline alone.')
_STEPS = flags.DEFINE_integer('steps', 20, 'Train steps timed (after compilation).')


def _iterator(config):
  stream = streams.Stream.of(config, 'train')
  return pipeline.make_iterator(stream, vocab_size=config.model.vocab_size)


def pipeline_tokens_per_second(config, batches: int) -> tuple[float, float]:
  """(all packed positions, positions holding a token) per second, after a warm-up."""
  it = _iterator(config)
  for _ in range(5):
    next(it)
  start, real = time.perf_counter(), 0.0
  for _ in range(batches):
    real += float(next(it)['loss_mask'].sum())
  elapsed = time.perf_counter() - start
  it.close()
  rows = config.batch_size // jax.process_count()
  return batches * rows * config.seq_len / elapsed, real / elapsed


def step_tokens_per_second(config, steps: int, *, feed: bool) -> float:
  trainer = train.Trainer.create(config)
  state = trainer.init_state()
  it = _iterator(config)
  batch = next(it)
  state, m = trainer.step(state, batch)  # Compiles.
  jax.block_until_ready(m)
  start = time.perf_counter()
  for _ in range(steps):
    state, m = trainer.step(state, next(it) if feed else batch)
  jax.block_until_ready(m)
  elapsed = time.perf_counter() - start
  it.close()
  return steps * config.batch_size * config.seq_len / elapsed


def main(argv):
  del argv
  config = _CONFIG.value
  packed, real = pipeline_tokens_per_second(config, _BATCHES.value)
  alone = step_tokens_per_second(config, _STEPS.value, feed=False)
  fed = step_tokens_per_second(config, _STEPS.value, feed=True)
  print(f'pipeline: {packed:,.0f} packed tokens/s per host ({real:,.0f} non-padding)')
  print(f'train step alone: {alone:,.0f} tokens/s; fed by the pipeline: {fed:,.0f} tokens/s')
  print(f'headroom: {packed / alone:,.0f}x')
  print(
    f'| {config.data.dataset} | {config.batch_size}x{config.seq_len} | {os.cpu_count()} CPU '
    f'({platform.machine()}), {jax.device_count()} {jax.devices()[0].platform} device(s) | '
    f'{packed:,.0f} | {alone:,.0f} | {fed:,.0f} | {packed / alone:,.0f}x |'
  )


if __name__ == '__main__':
  app.run(main)
