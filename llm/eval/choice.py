"""Multiple choice: each choice scored by the log-likelihood of its tokens after the context.

A task is JSON lines with `context`, `choices` and `label` (the index of the
right choice). `accuracy` takes the best sum, `accuracy_norm` the best sum per
UTF-8 byte of the choice (length-normalised, as the LM evaluation harness
does), so long choices are not penalised for their length.
"""

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from llm import generate, sharding
from llm.model import ModelConfig, Transformer, param_shardings


def _logprob_sums(params, inputs_BT, targets_BT, mask_BT, *, cfg: ModelConfig):
  T = inputs_BT.shape[1]
  positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), inputs_BT.shape)
  logits_BTV = Transformer(cfg).apply(
    {'params': params}, inputs_BT, positions_BT, (mask_BT >= 0).astype(jnp.int32)
  )
  logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
  target_logp_BT = jnp.take_along_axis(logp_BTV, targets_BT[..., None], -1)[..., 0]
  return jnp.sum(target_logp_BT * (mask_BT > 0), axis=-1)


@functools.lru_cache(maxsize=8)
def _logprob_fn(cfg: ModelConfig, mesh):
  fn = functools.partial(_logprob_sums, cfg=cfg)
  if mesh is None:
    return jax.jit(fn)
  rows = sharding.batch_sharding(mesh)
  params = param_shardings(cfg, mesh)
  return jax.jit(fn, in_shardings=(params, rows, rows, rows), out_shardings=rows)


def continuation_logprobs(
  cfg: ModelConfig, params, pairs: list[tuple[list[int], list[int]]], *, mesh=None, batch_size=16
) -> np.ndarray:
  """log p(continuation | context) for (context ids, continuation ids) pairs (float32 sums).

  Rows are padded to length buckets (generate.bucket_length) and batch_size
  rows (a multiple of the data-parallel ways), so a task compiles a few times.
  """
  for i, (ctx, cont) in enumerate(pairs):
    if not ctx or not cont:
      raise ValueError(f'Request {i} has an empty context or continuation (in tokens).')
    if len(ctx) + len(cont) - 1 > cfg.max_seq_len:
      raise ValueError(
        f"Request {i} has {len(ctx) + len(cont)} tokens but the model's context is "
        f'{cfg.max_seq_len} (model.max_seq_len); shorten its context.'
      )
  ways = 1 if mesh is None else sharding.batch_divisor(mesh)
  rows = math.ceil(batch_size / ways) * ways
  fn = _logprob_fn(cfg, mesh)
  # Similar lengths together: less padding.
  order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
  out = np.zeros((len(pairs),), np.float64)
  for start in range(0, len(order), rows):
    idx = order[start : start + rows]
    seqs = [pairs[i][0] + pairs[i][1] for i in idx]
    T = generate.bucket_length(max(len(s) - 1 for s in seqs), cfg.max_seq_len)
    inputs = np.zeros((rows, T), np.int32)
    targets = np.zeros((rows, T), np.int32)
    # 1: a continuation target; 0: a context target; -1: padding (its own segment).
    mask = np.full((rows, T), -1, np.int32)
    for r, i in enumerate(idx):
      seq, n_cont = seqs[r], len(pairs[i][1])
      inputs[r, : len(seq) - 1] = seq[:-1]
      targets[r, : len(seq) - 1] = seq[1:]
      mask[r, : len(seq) - 1] = 0
      mask[r, len(seq) - 1 - n_cont : len(seq) - 1] = 1
    with sharding.rules_context(mesh) if mesh is not None else contextlib.nullcontext():
      sums = fn(params, *(_rows(x, mesh) for x in (inputs, targets, mask)))
    out[idx] = np.asarray(jax.device_get(sums), np.float64)[: len(idx)]
  return out


def _rows(x: np.ndarray, mesh):
  if mesh is None:
    return x
  return jax.make_array_from_callback(x.shape, sharding.batch_sharding(mesh), lambda i: x[i])


def choice_task(
  cfg: ModelConfig, params, tokenizer, examples: list[dict], *, mesh=None, batch_size: int = 16
) -> tuple[dict, list[dict]]:
  """Accuracy by raw and length-normalised log-likelihood: (summary, per-example rows)."""
  pairs = []
  for n, e in enumerate(examples):
    if not e['choices'] or not all(isinstance(c, str) for c in e['choices']):
      raise ValueError(f'Example {n}: choices must be a non-empty list of strings.')
    if not 0 <= e['label'] < len(e['choices']):
      raise ValueError(
        f'Example {n}: label {e["label"]} is not an index into its {len(e["choices"])} choices.'
      )
    ctx = generate.encode_prompt(tokenizer, e['context'])
    pairs += [(ctx, list(tokenizer.encode(c))) for c in e['choices']]
  logp = continuation_logprobs(cfg, params, pairs, mesh=mesh, batch_size=batch_size)
  rows, k = [], 0
  for e in examples:
    scores = logp[k : k + len(e['choices'])]
    k += len(e['choices'])
    per_byte = scores / np.array([max(len(c.encode('utf-8')), 1) for c in e['choices']])
    rows.append(
      {
        'context': e['context'],
        'label': e['label'],
        'prediction': int(np.argmax(scores)),
        'prediction_norm': int(np.argmax(per_byte)),
        'logprobs': scores.tolist(),
      }
    )
  summary = {
    'accuracy': float(np.mean([r['prediction'] == r['label'] for r in rows])),
    'accuracy_norm': float(np.mean([r['prediction_norm'] == r['label'] for r in rows])),
    'examples': len(rows),
  }
  return summary, rows
