r"""Training: state initialisation, the train and eval steps, and the loop.

  python -m llm.train --config=experiments/NAME.py[:ARG] --workdir=DIR \
      [--config.KEY=VALUE ...]

Data flow: config -> mesh (llm/sharding.py) -> ModelConfig -> abstract state
from `jax.eval_shape` -> shardings from the logical axes -> `init_state`
materialises each shard where it lives -> `train_step` jitted once with those
shardings, the state donated -> batches from llm/data placed with
`sharding.global_batch`.
"""

import dataclasses
import functools
import json
import os
import signal
import threading
import time
from collections.abc import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from llm import checkpoint, finetune, finetune_metrics, optim, sharding
from llm import evaluate as evaluate_lib
from llm import metrics as metrics_lib
from llm.data import mlm, synthetic
from llm.model import ModelConfig, Transformer

State = dict  # {'params', 'opt_state', 'step'}


# ----------------------------------------------------------------------------
# Config checks.


def check_config(config: ml_collections.ConfigDict) -> None:
  """Stops on keys the defaults do not know: a typo must not be silently ignored."""
  from experiments import base  # Experiments are configs; importing here keeps llm/ standalone.

  _check_keys(config, base.get_config(), '')
  mlm.objective(config.data)  # A bad objective, or MLM on the synthetic stream, stops here.
  if config.data.dataset == 'synthetic' and config.eval_every > 0 and config.eval_steps <= 0:
    raise ValueError('The synthetic stream never ends: set eval_steps > 0 or eval_every=0.')
  if config.seq_len <= 0:
    raise ValueError(f'seq_len={config.seq_len} must be positive.')
  if config.seq_len > config.model.max_seq_len and config.model.position == 'learned':
    raise ValueError(
      f'seq_len={config.seq_len} exceeds model.max_seq_len={config.model.max_seq_len}, '
      'the number of learned positions.'
    )


def _check_keys(config, defaults, prefix: str) -> None:
  for key, value in config.items():
    if key not in defaults:
      raise ValueError(
        f'Unknown config key {prefix + key!r}; valid keys here: {", ".join(sorted(defaults))}.'
      )
    if isinstance(value, ml_collections.ConfigDict):
      _check_keys(value, defaults[key], f'{prefix}{key}.')


# ----------------------------------------------------------------------------
# Loss and steps.


def cross_entropy(logits_BTV, targets_BT, mask_BT, z_loss: float = 0.0):
  """Sums (not means) of token losses, so microbatches can be added exactly.

  Returns (sum of masked NLL, sum of the z-loss term, number of loss tokens).
  The z-loss (PaLM) pushes log Z toward 0, which keeps bf16 logits stable.
  """
  logits_BTV = logits_BTV.astype(jnp.float32)
  log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  nll = jnp.sum((log_z_BT - target_logit_BT) * mask_BT)
  z = z_loss * jnp.sum(jnp.square(log_z_BT) * mask_BT)
  return nll, z, jnp.sum(mask_BT)


def _loss_sums(params, batch, model: Transformer, z_loss: float):
  """Every objective is a masked cross-entropy: next token (LM, SFT), chosen tokens
  (MLM), or one label per row (classification: the batch's `logits_index` picks the
  position, and targets and loss_mask are [B, 1])."""
  logits = model.apply(
    {'params': params},
    batch['inputs'],
    batch['positions'],
    batch['segment_ids'],
    logits_index_B=batch.get('logits_index'),
    token_types_BT=batch.get('token_types'),
  )
  nll, z, tokens = cross_entropy(logits, batch['targets'], batch['loss_mask'], z_loss)
  return nll + z, (nll, tokens)


def train_step(
  state: State,
  batch: dict,
  *,
  model: Transformer,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  grad_accum: int = 1,
  z_loss: float = 0.0,
) -> tuple[State, dict]:
  """One optimizer update on the mean token loss of `batch`.

  With `grad_accum > 1` the batch is cut into microbatches whose gradient sums
  are accumulated by a `lax.scan`, then divided by the batch's loss-token count:
  the same update as one pass over the whole batch, in 1/grad_accum of the
  activation memory. Microbatch k takes rows k, k+A, k+2A, ... so each stays
  spread over every data-parallel device.
  """
  params = state['params']
  grad_fn = jax.value_and_grad(_loss_sums, has_aux=True)
  if grad_accum == 1:
    (_, (nll, tokens)), grads = grad_fn(params, batch, model, z_loss)
  else:
    micro = jax.tree.map(
      lambda x: x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1),
      batch,
    )
    micro = jax.tree.map(
      lambda x: nn.with_logical_constraint(x, (None, 'act_batch', 'act_length')[: x.ndim]), micro
    )

    def accumulate(carry, mb):
      (_, (nll, tokens)), g = grad_fn(params, mb, model, z_loss)
      acc_g, acc_nll, acc_tokens = carry
      return (jax.tree.map(jnp.add, acc_g, g), acc_nll + nll, acc_tokens + tokens), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, nll, tokens), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), micro)

  denom = jnp.maximum(tokens, 1.0)
  grads = jax.tree.map(lambda g: g / denom, grads)
  updates, opt_state = tx.update(grads, state['opt_state'], params)
  params = optax.apply_updates(params, updates)
  new_state = {'params': params, 'opt_state': opt_state, 'step': state['step'] + 1}
  metrics = {
    'loss': nll / denom,
    'grad_norm': optax.tree.norm(grads),
    'param_norm': optax.tree.norm(params),
    'learning_rate': schedule(state['step']),
    'loss_tokens': tokens,
  }
  return new_state, metrics


# ----------------------------------------------------------------------------
# State.


def abstract_state(model: Transformer, tx, batch_shape: tuple[int, int], rng):
  """The state's shapes with logical axes (boxed params), from `jax.eval_shape`."""

  def init(rng):
    params = model.init(rng, jnp.zeros(batch_shape, jnp.int32))['params']
    return {'params': params, 'step': jnp.zeros((), jnp.int32)}

  boxed = jax.eval_shape(init, rng)
  opt_state = jax.eval_shape(tx.init, nn.unbox(boxed['params']))
  return boxed, opt_state


def state_shardings(model: Transformer, tx, batch_shape, mesh, rng) -> State:
  """NamedShardings for every leaf of the state, from the logical-axis rules."""
  boxed, abstract_opt = abstract_state(model, tx, batch_shape, rng)
  params = sharding.logical_shardings(boxed['params'], mesh)
  return {
    'params': params,
    'opt_state': sharding.like_params(abstract_opt, nn.unbox(boxed['params']), params, mesh),
    'step': sharding.replicated(mesh),
  }


def _init_fn(model: Transformer, tx, batch_shape):
  def init(rng):
    params = nn.unbox(model.init(rng, jnp.zeros(batch_shape, jnp.int32))['params'])
    return {'params': params, 'opt_state': tx.init(params), 'step': jnp.zeros((), jnp.int32)}

  return init


def init_state(model: Transformer, tx, batch_shape, mesh, rng, shardings: State) -> State:
  """Initialises the state already sharded: no host ever holds all parameters."""
  with sharding.rules_context(mesh):
    return jax.jit(_init_fn(model, tx, batch_shape), out_shardings=shardings)(rng)


# ----------------------------------------------------------------------------
# Data.


def make_iterator(config, split: str, *, model_cfg: ModelConfig, num_epochs=None) -> Iterator:
  """This host's batches of `split` for `config.data`."""
  if config.data.dataset in finetune.DATASETS:
    return finetune.make_iterator(config, split, model_cfg=model_cfg, num_epochs=num_epochs)
  if config.data.dataset == 'synthetic':
    return synthetic.SyntheticIterator(
      vocab_size=model_cfg.vocab_size,
      batch_size=config.batch_size,
      seq_len=config.seq_len,
      seed=config.seed,
      num_sequences=config.data.synthetic_num_sequences,
      split=split,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
  from llm.data import pipeline

  return pipeline.make_iterator(
    config.data,
    split=split,
    batch_size=config.batch_size,
    seq_len=config.seq_len,
    seed=config.seed,
    shuffle=split == 'train',
    num_epochs=num_epochs,
    vocab_size=model_cfg.vocab_size,
  )


# ----------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class Trainer:
  """Everything built from a config that the loop, evaluation and tests share."""

  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  model_cfg: ModelConfig
  model: Transformer
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  shardings: State
  step_fn: callable

  @classmethod
  def create(cls, config, devices=None) -> 'Trainer':
    check_config(config)
    mesh = sharding.make_mesh(config.mesh, devices)
    model_cfg = ModelConfig.from_dict(config.model)
    model = Transformer(model_cfg)
    tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
    accum = int(config.optim.grad_accum)
    rows = sharding.batch_divisor(mesh)
    if config.batch_size % (accum * rows):
      raise ValueError(
        f'batch_size={config.batch_size} must be divisible by optim.grad_accum={accum} times '
        f'the {rows} data-parallel shards of the mesh (data x fsdp).'
      )
    batch_shape = (config.batch_size, config.seq_len)
    shardings = state_shardings(model, tx, batch_shape, mesh, jax.random.key(config.seed))
    batch_shardings = sharding.batch_sharding(mesh)
    step = functools.partial(
      train_step, model=model, tx=tx, schedule=schedule, grad_accum=accum, z_loss=config.z_loss
    )
    step_fn = jax.jit(
      step,
      in_shardings=(shardings, batch_shardings),
      out_shardings=(shardings, sharding.replicated(mesh)),
      donate_argnums=0,
    )
    return cls(config, mesh, model_cfg, model, tx, schedule, shardings, step_fn)

  def init_state(self) -> State:
    batch_shape = (self.config.batch_size, self.config.seq_len)
    rng = jax.random.key(self.config.seed)
    return init_state(self.model, self.tx, batch_shape, self.mesh, rng, self.shardings)

  def abstract_state(self) -> State:
    """The state as ShapeDtypeStructs carrying their shardings: a restore or compile target."""
    batch_shape = (self.config.batch_size, self.config.seq_len)
    shapes = jax.eval_shape(
      _init_fn(self.model, self.tx, batch_shape), jax.random.key(self.config.seed)
    )
    return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, self.shardings
    )

  def restore_or_init(self, ckpt: checkpoint.Checkpointer) -> tuple[State, Iterator]:
    """The newest complete checkpoint's state and data stream, or fresh ones.

    The restore targets this trainer's shardings, so a checkpoint written on
    any mesh continues on this one.
    """
    train_iter = make_iterator(self.config, 'train', model_cfg=self.model_cfg)
    step = ckpt.latest_step()
    if step is None:
      state = self.init_state()
      if self.config.init_from:  # Fine-tuning: pretrained params, fresh optimizer state.
        state['params'] = finetune.init_params(
          state['params'],
          self.config.init_from,
          step=self.config.init_from_step,
          model_cfg=self.model_cfg,
          shardings=self.shardings['params'],
        )
      return state, train_iter
    saved = ckpt.saved_config(step)
    checkpoint.check_compatible(saved['model'], self.model_cfg, ckpt.directory / str(step))
    state, data_state = ckpt.restore(step, self.abstract_state(), self.shardings)
    train_iter.set_state(data_state)
    print(f'Resumed from step {step} of {ckpt.directory}.', flush=True)
    return state, train_iter

  def step(self, state: State, host_batch: dict) -> tuple[State, dict]:
    with sharding.rules_context(self.mesh):
      return self.step_fn(state, sharding.global_batch(host_batch, self.mesh))

  def evaluate(self, params) -> dict:
    """Loss, perplexity and bits per byte over `eval_steps` validation batches (<= 0: all)."""
    c = self.config
    if c.data.dataset in finetune.DATASETS:  # Response-token loss; accuracy and macro-F1.
      return finetune_metrics.evaluate_config(
        self.model_cfg, params, c, mesh=self.mesh, max_batches=max(c.eval_steps, 0)
      )
    return evaluate_lib.evaluate_split(
      self.model_cfg,
      params,
      c.data,
      split='validation',
      batch_size=c.batch_size,
      seq_len=c.seq_len,
      mesh=self.mesh,
      seed=c.seed,
      max_batches=max(c.eval_steps, 0),
    )


def _check_finite(rows: list[tuple[int, dict]]) -> None:
  for step, m in rows:
    loss = float(m['loss'])
    if not np.isfinite(loss):
      raise FloatingPointError(
        f'The loss became {loss} at step {step}; lower optim.learning_rate, enable '
        'optim.clip_norm or z_loss, or check the data of that step.'
      )


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: the job may be retried and will resume.


class PreemptedError(Exception):
  """Raised after the state was saved on SIGTERM; the run resumes from that step."""


class _PreemptionFlag:
  """Turns SIGTERM (what a preempted TPU VM gets) into a flag checked between steps.

  With several hosts, they agree on the step through JAX's preemption sync
  point (set up by `jax.distributed.initialize`), so all save the same step.
  Signals after the first only log: the save in progress must finish.
  """

  def __init__(self):
    self._set = False
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del frame
    if self._set:
      print(f'Signal {signum} again: still saving, please wait.', flush=True)
    self._set = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      return multihost_utils.reached_preemption_sync_point(step)
    return self._set

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains per `config`, resuming from `workdir`'s newest checkpoint; returns the last row.

  Raises `PreemptedError` after saving when SIGTERM arrives.
  """
  trainer = Trainer.create(config)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  ckpt = checkpoint.Checkpointer(
    workdir,
    keep=config.keep_checkpoints,
    keep_period=config.keep_period,
    async_save=config.async_checkpointing,
  )
  state, train_iter = trainer.restore_or_init(ckpt)
  start = int(state['step'])
  writer = metrics_lib.Writer(workdir, resume_step=start)
  peak = config.peak_flops or metrics_lib.device_peak_flops(trainer.model_cfg.dtype)
  flops_per_step = (
    metrics_lib.train_flops_per_token(trainer.model_cfg, config.seq_len)
    * config.batch_size
    * config.seq_len
  )
  tokens_per_step = config.batch_size * config.seq_len
  total = config.total_steps
  print(
    f'Training {sum(x.size for x in jax.tree.leaves(state["params"])):,} parameters on mesh '
    f'{dict(trainer.mesh.shape)}, steps {start}..{total}.',
    flush=True,
  )

  preemption = _PreemptionFlag()
  pending: list[tuple[int, dict]] = []
  last_row: dict = {}
  loop_start = last_time = time.perf_counter()
  last_step = start
  try:
    for step in range(start, total):
      state, m = trainer.step(state, next(train_iter))
      pending.append((step + 1, m))
      if step == start:
        # The first step compiles; keep it out of the step time.
        jax.block_until_ready(m)
        last_time, last_step = time.perf_counter(), step + 1
        first_step_time = last_time - loop_start
        print(f'Compiled and ran the first step in {first_step_time:.1f}s.', flush=True)
      done = step + 1 == total
      preempted = preemption.reached(step + 1)
      if (step + 1) % config.log_every == 0 or done or preempted:
        pending = jax.device_get(pending)
        _check_finite(pending)
        now = time.perf_counter()
        steps = step + 1 - last_step
        step_time = (now - last_time) / steps if steps else first_step_time
        last_row = {
          **{k: float(v) for k, v in pending[-1][1].items()},
          'step_time': step_time,
          'tokens_per_second': tokens_per_step / step_time,
          'mfu': flops_per_step / step_time / (peak * jax.device_count()),
        }
        writer.write('metrics', step + 1, last_row)
        print(
          metrics_lib.progress_line(step + 1, total, last_row, now - loop_start, step + 1 - start),
          flush=True,
        )
        pending, last_time, last_step = [], now, step + 1
      if (step + 1) % config.checkpoint_every == 0 or done or preempted:
        ckpt.save(step + 1, state, train_iter.get_state(), config)
      if preempted:
        ckpt.wait()
        raise PreemptedError(
          f'PreemptedError: saved step {step + 1} in {ckpt.directory}; rerun to resume.'
        )
      if config.eval_every > 0 and ((step + 1) % config.eval_every == 0 or done):
        eval_row = trainer.evaluate(state['params'])
        writer.write('eval', step + 1, eval_row)
        print(f'eval at step {step + 1}: ' + json.dumps(eval_row), flush=True)
        last_time = time.perf_counter()  # Keep evaluation out of the step time.
  finally:
    preemption.restore()
    ckpt.wait()
    ckpt.close()
    writer.close()
  return last_row


def main(argv):
  del argv
  from absl import flags, logging

  logging.set_verbosity(logging.WARNING)  # Orbax and JAX log every save at INFO.
  if flags.FLAGS.multihost:
    # Cloud TPU VMs: finds the other workers itself. Also sets up the
    # preemption sync point that _PreemptionFlag relies on.
    jax.distributed.initialize()

  try:
    train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  except PreemptedError as e:
    print(e, flush=True)
    raise SystemExit(PREEMPTED_EXIT_CODE) from None
  except (ValueError, FloatingPointError) as e:
    # Bad input is the user's to fix: one sentence, no traceback.
    raise SystemExit(f'{type(e).__name__}: {e}') from None


if __name__ == '__main__':
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory for metrics and checkpoints.')
  flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize() (multi-host TPU).')
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
