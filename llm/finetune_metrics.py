"""Fine-tuning evaluation: response-token loss (SFT); accuracy and macro-F1 (classification).

Sums are taken per batch over all hosts (the jitted step returns replicated
totals), so the metrics are exact over the whole eval split. For
classification the sums include the confusion matrix, counts[true, predicted];
accuracy is its trace over its total, and macro-F1 the unweighted mean of
each class's F1 = 2 TP / (2 TP + FP + FN) over the classes that occur among
the true or predicted labels (scikit-learn's default set), so a class absent
from a small eval split does not count as a zero.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from llm import evaluate as evaluate_lib
from llm import sharding
from llm.model import ModelConfig, Transformer


def sums(params, batch: dict, *, cfg: ModelConfig) -> dict:
  """NLL and loss-token sums of a batch, and for a classifier its confusion counts."""
  logits = Transformer(cfg).apply(
    {'params': params},
    batch['inputs'],
    batch['positions'],
    batch['segment_ids'],
    logits_index_B=batch.get('logits_index'),
    token_types_BT=batch.get('token_types'),
  )
  mask = batch['loss_mask'].astype(jnp.float32)
  out = evaluate_lib.nll_sums(logits, batch['targets'], mask)
  if cfg.head == 'classifier':
    true_BC = jax.nn.one_hot(batch['targets'][:, 0], cfg.num_labels) * mask[:, :1]
    predicted_BC = jax.nn.one_hot(jnp.argmax(logits[:, 0], axis=-1), cfg.num_labels)
    out['confusion'] = jnp.einsum('BC,BK->CK', true_BC, predicted_BC)
  return out


@functools.lru_cache(maxsize=8)
def _sums_fn(cfg: ModelConfig, mesh):
  return jax.jit(functools.partial(sums, cfg=cfg), out_shardings=sharding.replicated(mesh))


def classification_metrics(confusion) -> dict:
  """Accuracy and macro-F1 from counts[true, predicted]."""
  confusion = np.asarray(confusion, np.float64)
  tp = np.diag(confusion)
  true, predicted = confusion.sum(1), confusion.sum(0)
  present = (true + predicted) > 0
  f1 = 2 * tp[present] / (true[present] + predicted[present])
  return {
    'accuracy': float(tp.sum() / max(confusion.sum(), 1.0)),
    'macro_f1': float(f1.mean()) if f1.size else 0.0,
  }


def evaluate(cfg: ModelConfig, params, batches, *, mesh, max_batches: int = 0) -> dict:
  """Metrics over `batches` (host-local, as from `finetune.make_iterator`); 0: all of them.

  SFT: loss (nats per response token), perplexity, tokens. Classification:
  loss (per example), accuracy, macro_f1, examples.
  """
  fn = _sums_fn(cfg, mesh)
  totals, n = None, 0
  with sharding.rules_context(mesh):
    for host_batch in batches:
      out = jax.device_get(fn(params, sharding.global_batch(host_batch, mesh)))
      totals = out if totals is None else jax.tree.map(np.add, totals, out)
      n += 1
      if 0 < max_batches <= n:
        break
  if totals is None:
    raise ValueError('The eval split gave no batches.')
  count = float(totals['tokens'])
  if cfg.head != 'classifier':
    return evaluate_lib.summarize(float(totals['nll_sum']), count)
  return {
    'loss': float(totals['nll_sum']) / max(count, 1.0),
    **classification_metrics(totals['confusion']),
    'examples': count,
    'batches': n,
  }


def evaluate_config(cfg: ModelConfig, params, config, *, split='validation', mesh, max_batches=0):
  """`evaluate` over a split of a fine-tuning run's data (`config`: the run's whole config)."""
  from llm import finetune

  batches = finetune.make_iterator(config, split, model_cfg=cfg, num_epochs=1)
  try:
    return evaluate(cfg, params, batches, mesh=mesh, max_batches=max_batches)
  finally:
    batches.close()
