"""Metric writers, FLOPs and MFU, and the progress line.

FLOPs per trained token (what MFU divides), following PaLM (Chowdhery et al.
2022, app. B) with the causal halving MaxText applies:

  6 * N_matmul              forward (2) + backward (4) over every matmul weight,
                            the output projection included, embeddings lookups not
  + 6 * L * T * N * H       attention scores and weighted values: 4*T*N*H per token
                            and layer forward for full attention, halved because a
                            causal token sees on average T/2 keys, times 3 for training

A mixture of experts counts the weights a token uses (its active
parameters): in a sparse layer the experts_per_token routed experts it is sent
to, the shared experts and the router, not the experts it skips. Dropped
token copies (capacity_factor > 0) are still counted, as the work planned.

Remat recomputation is not counted: MFU measures useful work, so recomputing
lowers it, as it should.
"""

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from llm.model import ModelConfig

# Dense bf16 peak FLOP/s per chip, from the vendors' spec sheets.
PEAK_FLOPS = {
  'TPU v4': 275e12,
  'TPU v5 lite': 197e12,  # v5e
  'TPU v5e': 197e12,
  'TPU v5p': 459e12,
  'TPU v5': 459e12,
  'TPU v6 lite': 918e12,  # v6e (Trillium)
  'TPU v6e': 918e12,
  'NVIDIA A100': 312e12,
  'NVIDIA H100': 989e12,
  'NVIDIA H200': 989e12,
}


def matmul_params(cfg: ModelConfig) -> int:
  """Weights that take part in a matmul per token (the N in 6N): its active ones.

  Dense layers use their d_ff MLP; sparse ones the experts_per_token routed
  expert MLPs (moe_d_ff wide), the shared one (num_shared_experts x moe_d_ff)
  and the router [D, E].
  """
  D, F, N, K, H, V = (
    cfg.d_model,
    cfg.d_ff,
    cfg.num_heads,
    cfg.num_kv_heads,
    cfg.head_dim,
    cfg.vocab_size,
  )
  attn = D * N * H * 2 + D * K * H * 2  # q, o and k, v
  per_width = D * (3 if cfg.mlp == 'swiglu' else 2)  # An MLP's weights per hidden unit.
  dense = attn + per_width * F
  Fe, E = cfg.expert_d_ff, cfg.num_experts
  sparse = attn + per_width * Fe * (cfg.experts_per_token + cfg.num_shared_experts) + D * E
  kinds = cfg.sparse_layers()
  return sum(sparse if s else dense for s in kinds) + D * V


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  attention = 6 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim
  if not cfg.causal:
    attention *= 2
  return 6 * matmul_params(cfg) + attention


def device_peak_flops(dtype: str = 'bfloat16') -> float:
  """Peak FLOP/s of one local device: the spec table, or a measured matmul on CPU.

  On CPU every (possibly fake) device shares the host's cores, so the host's
  measured throughput is divided among them.
  """
  device = jax.local_devices()[0]
  if device.platform == 'cpu':
    return measure_matmul_flops(dtype) / jax.local_device_count()
  for name, peak in PEAK_FLOPS.items():
    if device.device_kind.startswith(name):
      return peak
  raise ValueError(
    f'No peak FLOP/s known for device kind {device.device_kind!r}; set config.peak_flops.'
  )


_MEASURED: dict[str, float] = {}


def measure_matmul_flops(dtype: str = 'float32', n: int = 1024, repeats: int = 5) -> float:
  """Best achieved FLOP/s of a jitted n x n matmul (f32 accumulation) on one device."""
  if dtype in _MEASURED:
    return _MEASURED[dtype]
  device = jax.local_devices()[0]
  a = jax.device_put(jnp.ones((n, n), dtype), device)
  f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  f(a, a).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  _MEASURED[dtype] = 2 * n**3 / best
  return _MEASURED[dtype]


class Writer:
  """Appends metric rows to `DIR/NAME.jsonl` and TensorBoard events in `DIR/tensorboard`.

  Only process 0 writes, so multi-host runs produce one set of files.
  """

  def __init__(self, workdir: str, resume_step: int = 0):
    self._active = jax.process_index() == 0
    self._workdir = workdir
    self._tb = None
    if self._active:
      os.makedirs(workdir, exist_ok=True)
      _drop_rows_after(workdir, resume_step)
      from tensorboardX import SummaryWriter  # TensorFlow-free event writer.

      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, name: str, step: int, scalars: dict[str, float]) -> None:
    if not self._active:
      return
    row = {'step': int(step), **{k: _py(v) for k, v in scalars.items()}}
    with open(os.path.join(self._workdir, f'{name}.jsonl'), 'a') as f:
      f.write(json.dumps(row) + '\n')
    prefix = '' if name == 'metrics' else f'{name}/'
    for k, v in row.items():
      if k != 'step':
        self._tb.add_scalar(prefix + k, v, step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _drop_rows_after(workdir: str, step: int) -> None:
  """Forgets rows logged after the checkpoint a run resumes from: they are redone."""
  for name in ('metrics.jsonl', 'eval.jsonl'):
    path = os.path.join(workdir, name)
    if not os.path.exists(path):
      continue
    with open(path) as f:
      rows = [line for line in f if line.strip() and json.loads(line)['step'] <= step]
    with open(path + '.tmp', 'w') as f:
      f.writelines(rows)
    os.replace(path + '.tmp', path)


def _py(v):
  v = np.asarray(v).item()
  return v if math.isfinite(v) else str(v)


def progress_line(step: int, total: int, row: dict, elapsed: float, steps_done: int) -> str:
  """'step 120/1000 | loss 3.412 | 41.2k tok/s | MFU 31.5% | ETA 4m12s'."""
  eta = elapsed / max(steps_done, 1) * (total - step)
  return (
    f'step {step}/{total} | loss {row["loss"]:.4f} | '
    f'{row["tokens_per_second"] / 1e3:.1f}k tok/s | MFU {100 * row["mfu"]:.1f}% | '
    f'ETA {_duration(eta)}'
  )


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'
