"""The one masked cross-entropy, used by training and by every evaluation.

Every objective is this loss with other targets and masks, so the train step
has no branches and a classifier is evaluated by the same code as a language
model (the batch layouts are in docs/architecture.md):

  next token (LM, SFT)  targets are the inputs shifted by one; loss_mask 1 on
                        real tokens (SFT: on response tokens only)
  masked LM             targets are the original tokens; loss_mask 1 on the
                        chosen ones
  classification        targets and loss_mask are [B, 1]; the batch's
                        `logits_index` picks the position the head reads

Everything returns sums, not means, so microbatches, batches and hosts add up
exactly; means are taken once, over all of them (`summarize`).

Evaluation sums, beyond the NLL and the number of loss tokens: `correct`
(argmax equals the target; reported as accuracy for masked LM), `bytes` (the
UTF-8 bytes the targets stand for, from a per-id table, for bits per byte),
and for a classifier the confusion matrix counts[true, predicted], from
which accuracy and macro-F1 come: macro-F1 is the unweighted mean of each
class's F1 = 2 TP / (2 TP + FP + FN) over the classes that occur among the
true or predicted labels (scikit-learn's default set), so a class absent from
a small eval split does not count as a zero.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from llm import sharding
from llm.model import ModelConfig, Transformer, param_shardings


def forward(params, batch: dict, cfg: ModelConfig) -> jax.Array:
  """The model's logits for a batch of any objective ([B, 1, C] for a classifier)."""
  return Transformer(cfg).apply(
    {'params': params},
    batch['inputs'],
    batch['positions'],
    batch['segment_ids'],
    logits_index_B=batch.get('logits_index'),
    token_types_BT=batch.get('token_types'),
  )


def token_nll(logits_BTV: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(-log p(target), log Z) per position, in float32."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return log_z_BT - target_logit_BT, log_z_BT


def train_sums(params, batch: dict, cfg: ModelConfig, z_loss: float = 0.0):
  """(objective, (sum of NLL, loss tokens)) for `jax.value_and_grad(..., has_aux=True)`.

  The objective adds the z-loss (PaLM), which pushes log Z toward 0 and keeps
  bf16 logits stable; the NLL sum is what the loss metric reports.
  """
  nll_BT, log_z_BT = token_nll(forward(params, batch, cfg), batch['targets'])
  mask_BT = batch['loss_mask']
  nll = jnp.sum(nll_BT * mask_BT)
  z = z_loss * jnp.sum(jnp.square(log_z_BT) * mask_BT)
  return nll + z, (nll, jnp.sum(mask_BT))


def eval_sums(params, batch: dict, bytes_V: jax.Array, *, cfg: ModelConfig) -> dict:
  """The evaluation sums of one batch (see the module docstring)."""
  logits_BTV = forward(params, batch, cfg)
  mask_BT = batch['loss_mask'].astype(jnp.float32)
  targets_BT = batch['targets']
  nll_BT, _ = token_nll(logits_BTV, targets_BT)
  out = {'nll_sum': jnp.sum(nll_BT * mask_BT), 'tokens': jnp.sum(mask_BT)}
  if cfg.head == 'classifier':
    true_BC = jax.nn.one_hot(targets_BT[:, 0], cfg.num_labels) * mask_BT[:, :1]
    predicted_BC = jax.nn.one_hot(jnp.argmax(logits_BTV[:, 0], axis=-1), cfg.num_labels)
    out['confusion'] = jnp.einsum('BC,BK->CK', true_BC, predicted_BC)
    return out
  out['bytes'] = jnp.sum(bytes_V[targets_BT] * mask_BT)
  out['correct'] = jnp.sum((jnp.argmax(logits_BTV, axis=-1) == targets_BT) * mask_BT)
  return out


def summarize(nll_sum: float, tokens: float, num_bytes: float = 0.0) -> dict:
  """Loss (nats per token), perplexity and, when the text's bytes are known, bits per byte."""
  loss = nll_sum / max(tokens, 1.0)
  out = {'loss': loss, 'perplexity': float(np.exp(min(loss, 50.0))), 'tokens': tokens}
  if num_bytes > 0:
    out['bits_per_byte'] = nll_sum / math.log(2) / num_bytes
    out['bytes'] = num_bytes
  return out


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


@functools.lru_cache(maxsize=8)
def _eval_fn(cfg: ModelConfig, mesh):
  replicated = sharding.replicated(mesh)
  return jax.jit(
    functools.partial(eval_sums, cfg=cfg),
    in_shardings=(
      param_shardings(cfg, mesh),
      sharding.batch_sharding(mesh),
      replicated,
    ),
    out_shardings=replicated,
  )


def evaluate(
  cfg: ModelConfig,
  params,
  batches,
  *,
  mesh=None,
  bytes_V: np.ndarray | None = None,
  max_batches: int = 0,
  accuracy: bool = False,
  progress: str = '',
) -> dict:
  """Metrics of `params` over host-local `batches`, summed over all hosts.

  Args:
    cfg, params: the model; params sharded for `mesh` as in training (none: one device).
    batches: host-local batches of any objective, e.g. from `llm.data.streams`.
    bytes_V: UTF-8 bytes per token id, for bits per byte (None: not reported).
    max_batches: stop after this many batches; 0 reads them all.
    accuracy: also report the fraction of loss tokens predicted exactly (masked LM).
    progress: print a progress line every 20 batches under this label.

  Returns: loss, perplexity, tokens (and bits_per_byte, bytes, accuracy as
  asked), batches; for a classifier loss (per example), accuracy, macro_f1,
  examples, batches.
  """
  if mesh is None:
    mesh = sharding.one_device_mesh()
  table = np.zeros((cfg.vocab_size,), np.int32) if bytes_V is None else bytes_V
  fn = _eval_fn(cfg, mesh)
  totals, n = None, 0
  with sharding.rules_context(mesh):
    table = jax.device_put(table, sharding.replicated(mesh))
    for host_batch in batches:
      out = jax.device_get(fn(params, sharding.global_batch(host_batch, mesh), table))
      totals = out if totals is None else jax.tree.map(np.add, totals, out)
      n += 1
      if progress and n % 20 == 0:
        loss = float(totals['nll_sum']) / max(float(totals['tokens']), 1.0)
        print(f'{progress}: {n} batches, loss {loss:.4f}', flush=True)
      if 0 < max_batches <= n:
        break
  if totals is None:
    raise ValueError('The eval split gave no batches.')
  count = float(totals['tokens'])
  if cfg.head == 'classifier':
    return {
      'loss': float(totals['nll_sum']) / max(count, 1.0),
      **classification_metrics(totals['confusion']),
      'examples': count,
      'batches': n,
    }
  out = {**summarize(float(totals['nll_sum']), count, float(totals['bytes'])), 'batches': n}
  if accuracy:
    out['accuracy'] = float(totals['correct']) / max(count, 1.0)
  return out
