r"""Draws bench/results.png from the benchmarks' JSON files.

  python bench/plot.py

Reads bench/train_throughput.json (training tokens/s and MFU, ours against
Hugging Face) and, when present, bench/decode.json (decoding tokens/s);
`bench/train_throughput.py` calls this at its end, so the figure always shows
the latest run.
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
OURS, PEER = '#1f77b4', '#ff7f0e'


def _bars(ax, labels, ours, peer, ylabel, title, fmt):
  import numpy as np

  x = np.arange(len(labels))
  w = 0.38
  a = ax.bar(x - w / 2, ours, w, label='this project (JAX)', color=OURS)
  b = ax.bar(x + w / 2, peer, w, label='Hugging Face (PyTorch)', color=PEER)
  for bars in (a, b):
    for rect in bars:
      h = rect.get_height()
      ax.annotate(
        fmt(h), (rect.get_x() + rect.get_width() / 2, h), ha='center', va='bottom', fontsize=7
      )
  ax.set_xticks(x, labels, fontsize=8)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=10)


def main():
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  train = json.loads((HERE / 'train_throughput.json').read_text())
  decode_path = HERE / 'decode.json'
  decode = json.loads(decode_path.read_text()) if decode_path.exists() else None
  panels = 3 if decode else 2
  fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.2))
  rows = train['rows']
  labels = [f'{r["model"]}\n{r["dtype"]}\n{r["ratio"]:.2f}x' for r in rows]

  ax = axes[0]
  _bars(
    ax,
    labels,
    [r['ours_tokens_per_s'] for r in rows],
    [r['hf_tokens_per_s'] for r in rows],
    'tokens / s (log)',
    'Training step (fwd + bwd + AdamW)',
    lambda v: f'{v:,.0f}',
  )
  ax.set_yscale('log')
  ax.legend(fontsize=7, loc='upper left')

  ax = axes[1]
  _bars(
    ax,
    [f'{r["model"]}\n{r["dtype"]}' for r in rows],
    [100 * r['ours_mfu'] for r in rows],
    [100 * r['hf_mfu'] for r in rows],
    '% of the measured matmul roofline',
    'Training MFU',
    lambda v: f'{v:.0f}%',
  )
  ax.axhline(50, color='gray', ls='--', lw=0.8)
  peaks = train['roofline_flops']
  ax.set_xlabel(
    f'roofline: float32 {peaks["float32"] / 1e9:.0f}, bfloat16 {peaks["bfloat16"] / 1e9:.0f} '
    'GFLOP/s; dashed: the 50% target',
    fontsize=7,
  )
  ax.set_ylim(0, max(100 * max(r['ours_mfu'], r['hf_mfu']) for r in rows) * 1.15)

  if decode:
    ax = axes[2]
    drows = decode['rows']
    _bars(
      ax,
      [f'batch {r["batch"]}\n{r["ours_tokens_per_s"] / r["hf_tokens_per_s"]:.2f}x' for r in drows],
      [r['ours_tokens_per_s'] for r in drows],
      [r['hf_tokens_per_s'] for r in drows],
      'tokens / s',
      f'Decoding, {decode["preset"]} {decode["dtype"]} (KV cache)',
      lambda v: f'{v:,.0f}',
    )

  fig.suptitle(
    f'{train.get("machine", "CPU")}, {train.get("date", "")}; labels: ours / HF', fontsize=9
  )
  fig.tight_layout()
  out = HERE / 'results.png'
  fig.savefig(out, dpi=110)
  print(f'wrote {out.name}')


if __name__ == '__main__':
  main()
