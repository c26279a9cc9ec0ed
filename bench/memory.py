r"""Peak host memory of the GPT-2 124M train step against its analytic size.

  python bench/memory.py [--batch=4] [--seq_len=512] [--dtypes=float32,bfloat16]

Each variant runs in a fresh process (peak RSS is a high-water mark, so
variants must not share one): it measures the resident set after JAX has
started (the baseline), builds the training state on one CPU device, runs
three steps, and reads the process's peak RSS (`getrusage` ru_maxrss). The
difference is what the state and the step cost. Compared with

- the analytic state: parameters (4 bytes each), AdamW's two moments
  (8 bytes per parameter) and the gradients (4 bytes per parameter, live
  while the update runs);
- an analytic estimate of the activations the backward pass keeps (below);
- XLA's own plan for the compiled step (`compiled.memory_analysis()`):
  arguments, outputs not aliased to donated arguments, and temporaries.

Prints a Markdown table for bench/RESULTS.md and writes bench/memory.json.
"""

import argparse
import json
import os
import resource
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2**20


def activation_bytes(cfg, batch: int, seq_len: int) -> dict:
  """Bytes the backward pass keeps from the forward pass, by part, without remat.

  Per layer and token: the block input and its two norm outputs, q, k, v,
  the attention output and the residual after attention (D each, compute
  dtype), the MLP's pre- and post-GELU activations (F each, compute dtype),
  and the float32 softmax weights over the keys (N x T per token). Outside
  the layers: the float32 logits and their softmax for the loss (V each).
  Norm statistics and masks are small and left out.
  """
  D, F, N, L, V = cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.num_layers, cfg.vocab_size
  act = 2 if cfg.dtype == 'bfloat16' else 4
  tokens = batch * seq_len
  per_layer = tokens * ((8 * D + 2 * F) * act + N * seq_len * 4)
  return {
    'layers': L * per_layer,
    'logits': tokens * V * 4 * 2,
  }


def measure(dtype: str, batch: int, seq_len: int) -> dict:
  """Runs in the worker process: peak RSS of building the state and three steps."""
  sys.path.insert(0, ROOT)
  import jax
  import psutil

  from bench.common import random_batch
  from experiments import presets
  from llm import config as config_lib
  from llm import model as model_lib
  from llm import sharding, train
  from llm.model import ModelConfig

  jax.devices()  # Start the CPU client: part of the baseline.
  baseline = psutil.Process().memory_info().rss
  c = config_lib.get_config()
  c.model = config_lib.model_config(**presets.GPT2_124M, dtype=dtype)
  c.batch_size, c.seq_len, c.total_steps = batch, seq_len, 100
  c.mesh.data = 1
  trainer = train.Trainer.create(c, jax.devices()[:1])
  host_batch = random_batch(c.model.vocab_size, batch, seq_len)
  with sharding.rules_context(trainer.mesh):
    gb = sharding.global_batch(host_batch, trainer.mesh)
    compiled = trainer.step_fn.lower(trainer.abstract_state(), gb).compile()
  m = compiled.memory_analysis()
  state = trainer.init_state()
  after_init = psutil.Process().memory_info().rss
  for _ in range(3):
    state, metrics = trainer.step(state, host_batch)
    metrics['loss'].block_until_ready()
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux.
  cfg = ModelConfig.from_dict(c.model)
  return {
    'dtype': dtype,
    'batch': batch,
    'seq_len': seq_len,
    'params': model_lib.count_params(cfg),
    'baseline_rss': baseline,
    'after_init_rss': after_init,
    'peak_rss': peak,
    'xla_argument': int(m.argument_size_in_bytes),
    'xla_output': int(m.output_size_in_bytes),
    'xla_alias': int(m.alias_size_in_bytes),
    'xla_temp': int(m.temp_size_in_bytes),
    'activations': activation_bytes(cfg, batch, seq_len),
  }


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--batch', type=int, default=4)
  p.add_argument('--seq_len', type=int, default=512)
  p.add_argument('--dtypes', default='float32,bfloat16')
  p.add_argument('--json', default=os.path.join(ROOT, 'bench', 'memory.json'))
  p.add_argument('--worker', default='', help=argparse.SUPPRESS)  # The dtype.
  args = p.parse_args()
  if args.worker:
    print(json.dumps(measure(args.worker, args.batch, args.seq_len)))
    return

  rows = []
  for dtype in args.dtypes.split(','):
    cmd = [sys.executable, os.path.abspath(__file__), f'--worker={dtype}']
    cmd += [f'--batch={args.batch}', f'--seq_len={args.seq_len}']
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if run.returncode:
      raise SystemExit(f'{dtype} failed:\n{run.stderr[-3000:]}')
    rows.append(json.loads(run.stdout.strip().splitlines()[-1]))

  print(f'GPT-2 124M train step, batch {args.batch} x {args.seq_len}, one CPU device (MiB)')
  print(
    '| dtype | params | AdamW moments | grads | activations (estimate) | analytic total '
    '| XLA plan (args + temps + unaliased outputs) | peak RSS - baseline | baseline RSS |'
  )
  print('|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    n = r['params']
    acts = sum(r['activations'].values())
    analytic = 16 * n + acts
    xla = r['xla_argument'] + r['xla_temp'] + r['xla_output'] - r['xla_alias']
    r['analytic_total'] = analytic
    r['xla_peak'] = xla
    print(
      f'| {r["dtype"]} | {4 * n / MIB:.0f} | {8 * n / MIB:.0f} | {4 * n / MIB:.0f} '
      f'| {acts / MIB:.0f} (layers {r["activations"]["layers"] / MIB:.0f}, '
      f'logits {r["activations"]["logits"] / MIB:.0f}) | {analytic / MIB:.0f} | {xla / MIB:.0f} '
      f'| {(r["peak_rss"] - r["baseline_rss"]) / MIB:.0f} | {r["baseline_rss"] / MIB:.0f} |'
    )
  with open(args.json, 'w') as f:
    json.dump(rows, f, indent=2)


if __name__ == '__main__':
  main()
