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

Sequences longer than `CHUNK` never hold their [B, T, V] float32 logits: the
model hands over its final hidden states and the loss projects them chunk by
chunk (`chunked_token_nll`), with the same numbers. For Llama-3-8B at 8k
positions that is 3.9 GiB of logits per sequence, and their gradient.

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
from llm.model import ModelConfig, Transformer, layers, param_shardings
from llm.model.transformer import Head, unembed

# Positions per chunk of the cross-entropy (`chunked_token_nll`), which runs
# when T exceeds it. Llama-3-8B on v5e:4x4 by AOT compile (bench/RESULTS.md's
# command, fsdp=16, B=1 per chip), peak GiB per chip at T = 2k / 4k / 8k:
# whole logits 10.97 / 12.85 / 16.49; chunks of 512: 12.06 / 13.21 / 15.52;
# 1024: 10.34 / 12.07 / 15.84; 2048: 10.97 (whole) / 11.79 / 15.13; 4096 at
# 8k: 15.25. Smaller chunks are not smaller plans (XLA's packing of the
# remaining buffers decides), and a longer matmul keeps the MXU busier.
CHUNK = 2048


def forward(params, batch: dict, cfg: ModelConfig, *, hidden: bool = False):
  """(The model's logits for a batch of any objective, its routing statistics).

  Logits are [B, 1, C] for a classifier; hidden=True: (final hidden states,
  `Head`) instead, for `chunked_token_nll`. The statistics (`moe.STATS`,
  means over the sparse layers) are zeros for a dense model.
  """
  out, state = Transformer(cfg).apply(
    {'params': params},
    batch['inputs'],
    batch['positions'],
    batch['segment_ids'],
    logits_index_B=batch.get('logits_index'),
    token_types_BT=batch.get('token_types'),
    hidden=hidden,
    mutable=['moe_stats'],
  )
  return out, state['moe_stats']['mean'][0]


def token_nll(logits_BTV: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(-log p(target), log Z) per position, in float32."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return log_z_BT - target_logit_BT, log_z_BT


def chunked_token_nll(
  cfg: ModelConfig, x_BTD: jax.Array, head: Head, targets_BT: jax.Array, chunk: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`token_nll` and the argmax of `unembed(x_BTD)`, `chunk` positions at a time.

  The float32 logits of a chunk exist only inside one step of a `lax.scan`,
  and `jax.checkpoint` has the backward pass recompute them instead of keeping
  them, so memory is O(B x chunk x V), not [B, T, V] and its gradient. The
  positions are cut into n = ceil(T / chunk) chunks of t = ceil(T / n), padded
  at the end (padded positions are cut off before anything is summed, so they
  send no gradient). Chunk k holds positions k, k + n, k + 2n, ...: strided,
  so that a length split over devices (contiguous blocks of T) splits every
  chunk the same way, and no device waits for another's chunk. Where the
  argmax is unused (training), jit's dead-code elimination drops it.
  """
  B, T, _ = x_BTD.shape
  n = -(-T // chunk)
  t = -(-T // n)

  def split(a_BT):  # [B, T, ...] -> [n, B, t, ...]: a_nBt[k, :, i] = a_BT[:, i * n + k].
    a_BT = jnp.pad(a_BT, [(0, 0), (0, n * t - T)] + [(0, 0)] * (a_BT.ndim - 2))
    return jnp.moveaxis(a_BT.reshape(B, t, n, *a_BT.shape[2:]), 2, 0)

  @functools.partial(jax.checkpoint, prevent_cse=False)  # In a scan: no CSE to prevent.
  def one_chunk(head, x_BtD, targets_Bt):
    logits_BtV = unembed(cfg, layers.constrain(x_BtD, layers.BTD), head)
    nll_Bt, log_z_Bt = token_nll(logits_BtV, targets_Bt)
    return nll_Bt, log_z_Bt, jnp.argmax(logits_BtV, axis=-1).astype(jnp.int32)

  def step(_, xs):
    return None, one_chunk(head, *xs)

  _, out_nBt = jax.lax.scan(step, None, (split(x_BTD), split(targets_BT)))
  return tuple(jnp.moveaxis(a_nBt, 0, 2).reshape(B, n * t)[:, :T] for a_nBt in out_nBt)


def token_losses(
  params, batch: dict, cfg: ModelConfig, chunk: int = CHUNK
) -> tuple[tuple[jax.Array, jax.Array, jax.Array], dict]:
  """((NLL, log Z, argmax) per target position, routing statistics).

  Over chunks of positions when T > chunk; a classifier's [B, 1, C] logits
  are small and always taken whole.
  """
  T = batch['targets'].shape[1]
  if cfg.head == 'classifier' or chunk >= T:
    logits_BTV, stats = forward(params, batch, cfg)
    nll_BT, log_z_BT = token_nll(logits_BTV, batch['targets'])
    return (nll_BT, log_z_BT, jnp.argmax(logits_BTV, axis=-1)), stats
  (x_BTD, head), stats = forward(params, batch, cfg, hidden=True)
  return chunked_token_nll(cfg, x_BTD, head, batch['targets'], chunk), stats


def train_sums(
  params,
  batch: dict,
  cfg: ModelConfig,
  z_loss: float = 0.0,
  chunk: int = CHUNK,
  *,
  moe_aux_loss: float = 0.0,
  router_z_loss: float = 0.0,
):
  """(objective, (sum of NLL, loss tokens, routing statistics)) for `jax.value_and_grad`.

  The objective adds the z-loss (PaLM), which pushes log Z toward 0 and keeps
  bf16 logits stable, and for a mixture of experts the load-balancing and
  router z-losses (means over the batch, so weighted by its loss tokens to
  join the sums; zero for a dense model); the NLL sum is what the loss
  metric reports.
  """
  batch = sharding.balance_length(batch)  # Context parallelism's order; sums are unchanged.
  (nll_BT, log_z_BT, _), stats = token_losses(params, batch, cfg, chunk)
  mask_BT = batch['loss_mask']
  nll, tokens = jnp.sum(nll_BT * mask_BT), jnp.sum(mask_BT)
  z = z_loss * jnp.sum(jnp.square(log_z_BT) * mask_BT)
  routing = moe_aux_loss * stats['moe_aux_loss'] + router_z_loss * stats['router_z_loss']
  return nll + z + tokens * routing, (nll, tokens, stats)


def eval_sums(
  params, batch: dict, bytes_V: jax.Array, *, cfg: ModelConfig, chunk: int = CHUNK
) -> dict:
  """The evaluation sums of one batch (see the module docstring)."""
  batch = sharding.balance_length(batch)
  (nll_BT, _, predicted_BT), _ = token_losses(params, batch, cfg, chunk)
  mask_BT = batch['loss_mask'].astype(jnp.float32)
  targets_BT = batch['targets']
  out = {'nll_sum': jnp.sum(nll_BT * mask_BT), 'tokens': jnp.sum(mask_BT)}
  if cfg.head == 'classifier':
    true_BC = jax.nn.one_hot(targets_BT[:, 0], cfg.num_labels) * mask_BT[:, :1]
    predicted_BC = jax.nn.one_hot(predicted_BT[:, 0], cfg.num_labels)
    out['confusion'] = jnp.einsum('BC,BK->CK', true_BC, predicted_BC)
    return out
  out['bytes'] = jnp.sum(bytes_V[targets_BT] * mask_BT)
  out['correct'] = jnp.sum((predicted_BT == targets_BT) * mask_BT)
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
