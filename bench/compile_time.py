r"""Compile time of the train step against depth, with scan over layers on and off.

  python bench/compile_time.py [--layers=2,12,48,96] [--json=bench/compile_time.json]

For a GPT-2-like shape narrow enough that 96 layers fit in memory (d_model
256, 4 heads, d_ff 1024, vocabulary 8,192; batch 8 x 128), traces and lowers
(`jit(...).lower`) and then compiles (`.compile()`) the real train step of
`llm.train` (forward, backward, clipping, AdamW) from shapes only, for each
depth, with `model.scan_layers` on and off (unrolled only up to --max_unrolled
layers: its compile time grows faster than linearly). Prints a Markdown table and the
ratio of the 96-layer to the 2-layer time with scan, the figure the target
(< 1.5x) is about. Each variant runs in a fresh process, so no cache or
allocator state carries over from a previous variant.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPE = dict(
  norm='layernorm',
  mlp='gelu',
  position='learned',
  use_bias=True,
  tie_embeddings=True,
  d_model=256,
  num_heads=4,
  num_kv_heads=4,
  d_ff=1024,
  vocab_size=8192,
  max_seq_len=128,
)
BATCH, SEQ_LEN = 8, 128


def measure(num_layers: int, scan: bool) -> dict:
  """Seconds to trace + lower and to compile one train step (runs in the worker process)."""
  sys.path.insert(0, ROOT)
  import jax
  import jax.numpy as jnp

  from llm import config as config_lib
  from llm import sharding, train

  c = config_lib.get_config()
  c.model = config_lib.model_config(**SHAPE, num_layers=num_layers, scan_layers=scan)
  c.batch_size, c.seq_len, c.total_steps = BATCH, SEQ_LEN, 100
  c.mesh.data = 1
  trainer = train.Trainer.create(c, jax.devices()[:1])
  state = trainer.abstract_state()
  row = jax.ShapeDtypeStruct((BATCH, SEQ_LEN), jnp.int32)
  batch = {k: row for k in ('inputs', 'targets', 'segment_ids', 'positions')}
  batch['loss_mask'] = jax.ShapeDtypeStruct((BATCH, SEQ_LEN), jnp.float32)
  with sharding.rules_context(trainer.mesh):
    start = time.perf_counter()
    lowered = trainer.step_fn.lower(state, batch)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
  return {
    'layers': num_layers,
    'scan': scan,
    'lower_s': lowered_at - start,
    'compile_s': done - lowered_at,
    'hlo_chars': len(compiled.as_text()),
  }


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--layers', default='2,12,48,96')
  # Unrolled compile time grows faster than linearly (48 layers: minutes).
  p.add_argument('--max_unrolled', type=int, default=12, help='Deepest unrolled variant to run.')
  p.add_argument('--json', default=os.path.join(ROOT, 'bench', 'compile_time.json'))
  p.add_argument('--worker', default='', help=argparse.SUPPRESS)  # 'LAYERS,SCAN'.
  args = p.parse_args()
  if args.worker:
    layers, scan = args.worker.split(',')
    print(json.dumps(measure(int(layers), scan == '1')))
    return

  rows = []
  for scan in (True, False):
    for layers in (int(x) for x in args.layers.split(',')):
      if not scan and layers > args.max_unrolled:
        continue
      cmd = [sys.executable, os.path.abspath(__file__), f'--worker={layers},{int(scan)}']
      run = subprocess.run(cmd, capture_output=True, text=True, check=False)
      if run.returncode:
        raise SystemExit(f'{layers} layers, scan={scan} failed:\n{run.stderr[-3000:]}')
      row = json.loads(run.stdout.strip().splitlines()[-1])
      rows.append(row)
      print(
        f'{layers} layers, scan {"on" if scan else "off"}: lower {row["lower_s"]:.1f}s, '
        f'compile {row["compile_s"]:.1f}s',
        file=sys.stderr,
        flush=True,
      )

  import jax

  print(
    f'GPT-2-like, d_model {SHAPE["d_model"]}, batch {BATCH}x{SEQ_LEN}; '
    f'{platform.machine()} CPU, {os.cpu_count()} cores; jax {jax.__version__}'
  )
  print(
    '| layers | scan: lower (s) | scan: compile (s) | unrolled: lower (s) | unrolled: compile (s) |'
  )
  print('|---|---|---|---|---|')
  by = {(r['layers'], r['scan']): r for r in rows}
  depths = sorted({r['layers'] for r in rows})
  for n in depths:
    s, u = by[(n, True)], by.get((n, False))
    unrolled = f'{u["lower_s"]:.2f} | {u["compile_s"]:.2f}' if u else 'not run | not run'
    print(f'| {n} | {s["lower_s"]:.2f} | {s["compile_s"]:.2f} | {unrolled} |')
  ratios = {}
  for scan, name in ((True, 'scan'), (False, 'unrolled')):
    ran = sorted(r['layers'] for r in rows if r['scan'] == scan)
    lo, hi = ran[0], ran[-1]
    a, b = by[(lo, scan)], by[(hi, scan)]
    ratios[name] = {
      'compile': b['compile_s'] / a['compile_s'],
      'lower_and_compile': (b['lower_s'] + b['compile_s']) / (a['lower_s'] + a['compile_s']),
    }
    print(
      f'{name}: {hi} / {lo} layers: compile {ratios[name]["compile"]:.2f}x, '
      f'lower + compile {ratios[name]["lower_and_compile"]:.2f}x'
    )
  with open(args.json, 'w') as f:
    json.dump({'rows': rows, 'ratios': ratios, 'jax': jax.__version__}, f, indent=2)


if __name__ == '__main__':
  main()
