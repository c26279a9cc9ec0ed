r"""What an asynchronous checkpoint costs the training loop, measured side by side.

  python bench/checkpoint_overhead.py --config=experiments/shakespeare.py

Runs the experiment's real train step three ways in one process, on the same
batches: no saves; a save every `--every` steps with orbax's asynchronous
saving (the default in training); and the same with synchronous saving, for
scale. Reports the blocking time of one save (what the loop waits for before
its next step) and the loop's slowdown, both as a fraction of the step time,
and what the arrays' checksums (computed on the devices inside every save, so
part of its blocking time) cost on their own, with the memory XLA plans for them.
"""

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from llm import train  # noqa: E402
from llm.data import streams  # noqa: E402
from llm.io import checkpoint  # noqa: E402

config_flags.DEFINE_config_file('config', 'experiments/shakespeare.py', 'Experiment config.')
flags.DEFINE_integer('steps', 60, 'Steps per variant.')
flags.DEFINE_integer('every', 10, 'Save every this many steps (harsher than any experiment).')
flags.DEFINE_integer('repeats', 20, 'Timed checksum passes over the state.')


def _run(trainer, state, batches, workdir, every, async_save):
  """Wall time of the loop over `batches`, and the blocking time of each save."""
  ckpt = checkpoint.Checkpointer(workdir, keep=2, async_save=async_save) if workdir else None
  blocking = []
  start = time.perf_counter()
  for i, batch in enumerate(batches):
    state, m = trainer.step(state, batch)
    if ckpt and (i + 1) % every == 0:
      m['loss'].block_until_ready()  # Attribute only the save's own time to it.
      t = time.perf_counter()
      ckpt.save(int(state['step']), state, {'step': i}, trainer.config)
      blocking.append(time.perf_counter() - t)
  m['loss'].block_until_ready()
  loop = time.perf_counter() - start
  if ckpt:
    ckpt.wait()
    ckpt.close()
  return state, loop, blocking


def _checksum_time(state, repeats):
  """Median seconds of one `checkpoint.checksums(state)` (the sums reach the host), after a
  warm-up, and the temporaries XLA plans for it (bytes per device)."""
  checkpoint.checksums(state)  # Compile.
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    checkpoint.checksums(state)
    times.append(time.perf_counter() - t)
  leaves = jax.tree.leaves(state)
  fn = checkpoint._checksum_fn(checkpoint._replicated(leaves[0]))
  temp = fn.lower(leaves).compile().memory_analysis().temp_size_in_bytes
  return statistics.median(times), temp


def main(argv):
  del argv
  config = flags.FLAGS.config
  steps, every = flags.FLAGS.steps, flags.FLAGS.every
  trainer = train.Trainer.create(config)
  state = trainer.init_state()
  it = streams.make_iterator(streams.Stream.of(config, 'train'), trainer.model_cfg)
  batches = [next(it) for _ in range(steps)]
  state, _, _ = _run(trainer, state, batches[:5], None, every, True)  # Compile and warm up.

  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    for name, workdir, async_save in [
      ('no saves', None, True),
      ('async saves', f'{tmp}/async', True),
      ('sync saves', f'{tmp}/sync', False),
    ]:
      state, loop, blocking = _run(trainer, state, batches, workdir, every, async_save)
      results[name] = (loop, blocking)

  checksum_time, checksum_temp = _checksum_time(state, flags.FLAGS.repeats)

  base_loop = results['no saves'][0]
  step_time = base_loop / steps
  params = sum(x.size for x in jax.tree.leaves(state['params']))
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  print(
    f'{config.model.num_layers}-layer model, {params:,} parameters, batch '
    f'{config.batch_size}x{config.seq_len}; {steps} steps per variant, a save every {every}.'
  )
  print(f'step time without saves: {1e3 * step_time:.1f} ms')
  for name in ('async saves', 'sync saves'):
    loop, blocking = results[name]
    per_save = statistics.median(blocking)
    print(
      f'{name}: one save blocks {1e3 * per_save:.1f} ms = {100 * per_save / step_time:.1f}% of a '
      f'step; loop slowdown {100 * (loop - base_loop) / base_loop:+.1f}% '
      f'(with a save every {every} steps)'
    )
  per_save = statistics.median(results['async saves'][1])
  print(
    f'checksums of the {state_bytes / 2**20:.1f} MiB state: {1e3 * checksum_time:.1f} ms '
    f'(median of {flags.FLAGS.repeats}) = {100 * checksum_time / per_save:.1f}% of an async '
    f"save's blocking time (which includes them) = {100 * checksum_time / step_time:.1f}% of a "
    f'step; XLA plans {checksum_temp / 2**20:.1f} MiB of temporaries for them'
  )


if __name__ == '__main__':
  app.run(main)
