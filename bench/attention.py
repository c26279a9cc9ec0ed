r"""Attention kernels side by side: one training step's time and memory against sequence length.

  python bench/attention.py [--seq_lens=1024,4096,16384] [--impls=xla,blockwise]
      [--dtype=float32] [--steps=3] [--rss]

One training step (forward, backward, AdamW) of a small Llama-style model
(2 layers, d_model 256, 4 heads of 64 over 2 kv heads, SwiGLU 768, vocabulary
512, layers unrolled as CPU runs prefer), batch 1, one document per row, on one
device of this host, once per `model.attention_impl`. For each length every
variant is compiled first, then the variants' steps alternate (one warm-up
each, then `--steps` timed, median), so load from other processes hits them
alike. Memory:

- XLA's plan for the compiled step (`compiled.memory_analysis()`): its
  temporaries (activations kept for the backward pass, gradients, the
  attention buffers) and the peak (arguments + temporaries + unaliased outputs);
- with `--rss`, the measured peak resident set of a fresh process that builds
  the state and runs two steps, less its resident set once JAX is up.

A variant whose plan exceeds the memory this host has free is compiled but
not run (its time is reported as such).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2**20

MODEL = dict(vocab_size=512, num_layers=2, d_model=256, num_heads=4, num_kv_heads=2, d_ff=768)


def _trainer(impl: str, seq_len: int, dtype: str):
  import jax

  from llm import config as config_lib
  from llm import train

  c = config_lib.get_config()
  c.model = config_lib.model_config(
    **MODEL, max_seq_len=seq_len, dtype=dtype, attention_impl=impl, scan_layers=False
  )
  c.batch_size, c.seq_len, c.total_steps, c.mesh.data = 1, seq_len, 100, 1
  c.optim.warmup_steps = 1
  return train.Trainer.create(c, jax.devices()[:1])


def _batch(seq_len: int) -> dict:
  import numpy as np

  tokens = np.random.default_rng(0).integers(0, MODEL['vocab_size'], (1, seq_len + 1))
  return {
    'inputs': tokens[:, :-1].astype(np.int32),
    'targets': tokens[:, 1:].astype(np.int32),
    'segment_ids': np.ones((1, seq_len), np.int32),
    'positions': np.arange(seq_len, dtype=np.int32)[None],
    'loss_mask': np.ones((1, seq_len), np.float32),
  }


def _plan(trainer, batch) -> dict:
  from llm import sharding

  with sharding.rules_context(trainer.mesh):
    gb = sharding.global_batch(batch, trainer.mesh)
    m = trainer.step_fn.lower(trainer.abstract_state(), gb).compile().memory_analysis()
  args, out, alias = m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes
  return {'temp': int(m.temp_size_in_bytes), 'peak': int(args + out - alias + m.temp_size_in_bytes)}


def compare(seq_len: int, impls: list[str], dtype: str, steps: int) -> list[dict]:
  """Plans, then alternating timed steps of every variant at one length."""
  import psutil

  batch = _batch(seq_len)
  rows, runs = [], []
  for impl in impls:
    trainer = _trainer(impl, seq_len, dtype)
    row = {'impl': impl, 'seq_len': seq_len, 'dtype': dtype, **_plan(trainer, batch)}
    rows.append(row)
    if row['peak'] < 0.8 * psutil.virtual_memory().available:
      runs.append((row, trainer, [trainer.init_state()]))
    else:
      row['step_s'] = None  # Would not fit in this host's free memory.
  for i in range(steps + 1):
    for row, trainer, state in runs:
      start = time.perf_counter()
      state[0], metrics = trainer.step(state[0], batch)
      float(metrics['loss'])
      if i:  # The first step is the warm-up.
        row.setdefault('times', []).append(time.perf_counter() - start)
      row['loss'] = float(metrics['loss'])
  for row, _, _ in runs:
    row['step_s'] = statistics.median(row.pop('times'))
  return rows


def measure_rss(impl: str, seq_len: int, dtype: str) -> int:
  """In a worker process: peak RSS of building the state and two steps, less the baseline."""
  import jax
  import psutil

  jax.devices()
  baseline = psutil.Process().memory_info().rss
  trainer = _trainer(impl, seq_len, dtype)
  state, batch = trainer.init_state(), _batch(seq_len)
  for _ in range(2):
    state, metrics = trainer.step(state, batch)
    float(metrics['loss'])
  return _peak_rss() - baseline


def _peak_rss() -> int:
  """This process's peak resident set: VmHWM, which, unlike getrusage's ru_maxrss, does
  not carry over the parent's resident set from before the exec (Linux)."""
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) * 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_in_fresh_process(impl: str, seq_len: int, dtype: str) -> int | None:
  cmd = [sys.executable, os.path.abspath(__file__), f'--worker={impl},{seq_len},{dtype}']
  run = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if run.returncode:
    print(f'{impl} at {seq_len}: the RSS worker failed:\n{run.stderr[-2000:]}', file=sys.stderr)
    return None
  return int(run.stdout.strip().splitlines()[-1])


def _table(rows: list[dict], impls: list[str]) -> str:
  base, *others = impls
  mib = lambda b: f'{b / MIB:,.0f}' if b is not None else 'not run'
  sec = lambda s: f'{s:.2f}' if s is not None else 'not run'
  lines = [
    '| T | kernel | step (s) | XLA temporaries (MiB) | XLA peak (MiB) | peak RSS - baseline (MiB) '
    f'| time / {base} | temporaries / {base} |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for r in rows:
    ref = next(x for x in rows if x['impl'] == base and x['seq_len'] == r['seq_len'])
    t_ratio = (
      f'{r["step_s"] / ref["step_s"]:.2f}' if r['step_s'] is not None and ref['step_s'] else '-'
    )
    lines.append(
      f'| {r["seq_len"]:,} | {r["impl"]} | {sec(r["step_s"])} | {mib(r["temp"])} '
      f'| {mib(r["peak"])} | {mib(r.get("rss"))} | {t_ratio} | {r["temp"] / ref["temp"]:.3f} |'
    )
  del others
  return '\n'.join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--seq_lens', default='1024,4096,16384')
  p.add_argument('--impls', default='xla,blockwise')
  p.add_argument('--dtype', default='float32')
  p.add_argument('--steps', type=int, default=3)
  p.add_argument('--rss', action='store_true', help='Also measure peak RSS, fresh processes.')
  p.add_argument('--json', default='')
  p.add_argument('--worker', default='', help=argparse.SUPPRESS)  # impl,seq_len,dtype
  args = p.parse_args()
  sys.path.insert(0, ROOT)
  if args.worker:
    impl, seq_len, dtype = args.worker.split(',')
    print(measure_rss(impl, int(seq_len), dtype))
    return
  impls = args.impls.split(',')
  rows = []
  for seq_len in (int(s) for s in args.seq_lens.split(',')):
    found = compare(seq_len, impls, args.dtype, args.steps)
    for r in found:
      if args.rss and r['step_s'] is not None:
        r['rss'] = _rss_in_fresh_process(r['impl'], seq_len, args.dtype)
      print(json.dumps(r), flush=True)
    rows += found
  print(f'\nOne train step, {MODEL}, batch 1, {args.dtype}, one CPU device')
  print(_table(rows, impls))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=1)


if __name__ == '__main__':
  main()
