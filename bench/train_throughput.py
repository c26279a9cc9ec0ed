r"""Training throughput against Hugging Face GPT-2 in PyTorch, on the same CPU, in one run.

  pip install -r requirements.txt -r bench/requirements.txt
  python bench/train_throughput.py   # writes bench/train_throughput.json and bench/results.png

For each model size (GPT-2 124M and a ~10M-parameter GPT-2) and dtype, times
one full training step (forward, backward, global-norm clipping, AdamW update)
of this project's jitted step and of `GPT2LMHeadModel` + `torch.optim.AdamW`
(eager), on the same batch shape, after warm-up, and reports tokens/s, their
ratio, and each side's MFU against the matmul roofline measured in the same
run (float32, and bfloat16 with float32 accumulation). Dropout is off on both
sides; bfloat16 is `model.dtype='bfloat16'` here and `torch.autocast` there.

Our side scans over layers in float32 and unrolls them in bfloat16
(--scan_layers=auto; 'on' or 'off' to force): measured on this CPU, either
choice is the faster one for that dtype (bench/RESULTS.md). The two sides alternate step by step
(`--interleave`, the default), so load from other processes hits both alike;
the load averages before and after are recorded. Ends by redrawing
bench/results.png (bench/plot.py) from this file and bench/decode.json.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from bench.common import alternate, random_batch  # noqa: E402
from experiments import presets  # noqa: E402
from llm import config as config_lib
from llm import metrics, train  # noqa: E402
from llm import model as model_lib  # noqa: E402
from llm.model import ModelConfig  # noqa: E402

OUT = Path(__file__).with_name('train_throughput.json')

SIZES = {
  'gpt2_124m': dict(presets.GPT2_124M, max_seq_len=1024),
  'gpt2_10m': dict(
    presets.GPT2_124M,
    num_layers=6,
    d_model=256,
    num_heads=8,
    num_kv_heads=8,
    d_ff=1024,
    vocab_size=8192,
    max_seq_len=1024,
  ),
}
# A batch that fits comfortably in 24 GiB for the largest model on both sides.
BATCH = {'gpt2_124m': (4, 512), 'gpt2_10m': (16, 256)}


def roofline(dtype: str, n: int = 2048) -> float:
  return metrics.measure_matmul_flops(dtype, n=n, repeats=10)


def ours(size: str, dtype: str, scan_layers: bool):
  """A function that runs one step of llm.train's jitted step on one device."""
  B, T = BATCH[size]
  c = config_lib.get_config()
  c.model = config_lib.model_config(**SIZES[size], dtype=dtype, scan_layers=scan_layers)
  c.batch_size, c.seq_len, c.total_steps = B, T, 100
  c.mesh.data = 1
  trainer = train.Trainer.create(c, jax.devices()[:1])
  state = [trainer.init_state()]
  batch = random_batch(c.model.vocab_size, B, T)

  def step():
    state[0], m = trainer.step(state[0], batch)
    m['loss'].block_until_ready()

  return step


def hugging_face(size: str, dtype: str):
  """A function that runs one training step of GPT2LMHeadModel with torch AdamW (eager)."""
  B, T = BATCH[size]
  s = SIZES[size]
  cfg = transformers.GPT2Config(
    vocab_size=s['vocab_size'],
    n_positions=s['max_seq_len'],
    n_embd=s['d_model'],
    n_layer=s['num_layers'],
    n_head=s['num_heads'],
    n_inner=s['d_ff'],
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
  )
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(cfg)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
  tokens = torch.randint(0, s['vocab_size'], (B, T))

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == 'bfloat16'):
      loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

  return step


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--sizes', default=','.join(SIZES))
  p.add_argument('--dtypes', default='float32,bfloat16')
  p.add_argument('--scan_layers', default='auto', choices=('auto', 'on', 'off'))
  p.add_argument('--steps', type=int, default=6, help='Timed steps per side (after 2 warm-up).')
  args = p.parse_args()
  torch.set_num_threads(max(torch.get_num_threads(), 1))
  load_before = os.getloadavg()
  peaks = {d: roofline(d) for d in ('float32', 'bfloat16')}
  rows = []
  for size in args.sizes.split(','):
    cfg = ModelConfig(**SIZES[size])
    B, T = BATCH[size]
    flops = metrics.train_flops_per_token(cfg, T) * B * T
    for dtype in args.dtypes.split(','):
      scan = args.scan_layers == 'on' or (args.scan_layers == 'auto' and dtype == 'float32')
      steps = {'ours': ours(size, dtype, scan), 'hf': hugging_face(size, dtype)}
      timed = alternate(steps, n=args.steps)
      del steps
      t_ours, t_hf = timed['ours'], timed['hf']
      row = {
        'model': size,
        'params': model_lib.count_params(cfg),
        'dtype': dtype,
        'scan_layers': scan,
        'batch': B,
        'seq_len': T,
        'ours_tokens_per_s': B * T / t_ours,
        'hf_tokens_per_s': B * T / t_hf,
        'ratio': t_hf / t_ours,
        'ours_mfu': flops / t_ours / peaks[dtype],
        'hf_mfu': flops / t_hf / peaks[dtype],
      }
      rows.append(row)
      print(
        f'{size} {dtype}: ours {row["ours_tokens_per_s"]:.0f} tok/s (MFU {row["ours_mfu"]:.1%}), '
        f'HF {row["hf_tokens_per_s"]:.0f} tok/s (MFU {row["hf_mfu"]:.1%}), '
        f'ratio {row["ratio"]:.2f}x',
        flush=True,
      )
  result = {
    'roofline_flops': peaks,
    'rows': rows,
    'torch': torch.__version__,
    'transformers': transformers.__version__,
    'jax': jax.__version__,
    'threads': torch.get_num_threads(),
    'machine': f'{platform.machine()}, {os.cpu_count()} cores',
    'load_before': load_before,
    'load_after': os.getloadavg(),
    'date': time.strftime('%Y-%m-%d'),
  }
  OUT.write_text(json.dumps(result, indent=2))
  print(
    f'roofline: float32 {peaks["float32"] / 1e9:.1f} GFLOP/s, '
    f'bfloat16 {peaks["bfloat16"] / 1e9:.1f} GFLOP/s; load average before '
    f'{load_before[0]:.1f}, after {result["load_after"][0]:.1f}; wrote {OUT.name}'
  )
  import plot

  plot.main()


if __name__ == '__main__':
  main()
