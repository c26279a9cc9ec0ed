r"""Training: state initialisation, the train and eval steps, and the loop.

  python -m llm.train --config=experiments/NAME.py[:ARG] --workdir=DIR \
      [--config.KEY=VALUE ...]

Data flow: config -> mesh (llm/sharding/) -> ModelConfig, its kernels
resolved for the mesh's platform -> abstract state from `jax.eval_shape` ->
shardings from the logical axes -> `init_state` materialises each shard where
it lives -> `train_step` jitted once with those shardings, the state donated
-> batches from `llm.data.streams` placed with `sharding.global_batch`. The
loss is `llm.losses`', the same that every evaluation uses.
"""

import dataclasses
import functools
import json
import time
from collections.abc import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from llm import config as config_lib
from llm import finetune, losses, optim, resume, sharding
from llm import metrics as metrics_lib
from llm.data import streams
from llm.io import checkpoint
from llm.io import workdir as workdir_lib
from llm.model import ModelConfig, Transformer, moe, param_shardings, resolve
from llm.preemption import PREEMPTED_EXIT_CODE, PreemptedError, PreemptionFlag

State = dict  # {'params', 'opt_state', 'step'}


# ----------------------------------------------------------------------------
# The step.


def train_step(
  state: State,
  batch: dict,
  *,
  cfg: ModelConfig,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  grad_accum: int = 1,
  z_loss: float = 0.0,
  moe_aux_loss: float = 0.0,
  router_z_loss: float = 0.0,
) -> tuple[State, dict]:
  """One optimizer update on the mean token loss of `batch`.

  With `grad_accum > 1` the batch is cut into microbatches whose gradient sums
  are accumulated by a `lax.scan`, then divided by the batch's loss-token count:
  the same update as one pass over the whole batch, in 1/grad_accum of the
  activation memory. Microbatch k takes rows k, k+A, k+2A, ... so each stays
  spread over every data-parallel device. The routing statistics of a mixture
  of experts are means over the microbatches (zeros for a dense model).
  """
  params = state['params']
  objective = functools.partial(
    losses.train_sums, moe_aux_loss=moe_aux_loss, router_z_loss=router_z_loss
  )
  grad_fn = jax.value_and_grad(objective, has_aux=True)
  if grad_accum == 1:
    (_, (nll, tokens, stats)), grads = grad_fn(params, batch, cfg, z_loss)
  else:
    micro = jax.tree.map(
      lambda x: x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1),
      batch,
    )
    micro = jax.tree.map(
      lambda x: nn.with_logical_constraint(x, (None, 'act_batch', 'act_length')[: x.ndim]), micro
    )

    def accumulate(carry, mb):
      (_, (nll, tokens, stats)), g = grad_fn(params, mb, cfg, z_loss)
      return jax.tree.map(jnp.add, carry, (g, nll, tokens, stats)), None

    zeros = jax.tree.map(jnp.zeros_like, (params, 0.0, 0.0, moe.zero_stats()))
    (grads, nll, tokens, stats), _ = jax.lax.scan(accumulate, zeros, micro)
    stats = jax.tree.map(lambda s: s / grad_accum, stats)

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
    **stats,
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
  params = param_shardings(model.cfg, mesh)
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
    """Checks `config`, builds the mesh, resolves the model's kernels for its platform."""
    config_lib.check(config)
    mesh = sharding.make_mesh(config.mesh, devices)
    sharding.check_length(config.seq_len, mesh)
    model_cfg = resolve(ModelConfig.from_dict(config.model), mesh)
    streams.check(config.data, model_cfg)
    model = Transformer(model_cfg)
    tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
    accum = int(config.optim.grad_accum)
    rows = sharding.batch_divisor(mesh)
    if config.batch_size % (accum * rows):
      raise ValueError(
        f'batch_size={config.batch_size} must be divisible by optim.grad_accum={accum} times '
        f'the {rows} data-parallel shards of the mesh (data x fsdp x expert).'
      )
    batch_shape = (config.batch_size, config.seq_len)
    shardings = state_shardings(model, tx, batch_shape, mesh, jax.random.key(config.seed))
    batch_shardings = sharding.batch_sharding(mesh)
    step = functools.partial(
      train_step,
      cfg=model_cfg,
      tx=tx,
      schedule=schedule,
      grad_accum=accum,
      z_loss=config.z_loss,
      moe_aux_loss=config.moe_aux_loss,
      router_z_loss=config.router_z_loss,
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

  def restore_or_init(
    self, ckpt: checkpoint.Checkpointer | None, step: int | None = None
  ) -> tuple[State, Iterator]:
    """Checkpoint `step`'s state and data stream (default: the newest), or fresh ones.

    The restore targets this trainer's shardings, so a checkpoint written on
    any mesh continues on this one. A checkpoint saved on other data than this
    config reads is refused unless `resume_on_new_data` (docs/workdir.md).
    """
    train_iter = streams.make_iterator(streams.Stream.of(self.config, 'train'), self.model_cfg)
    step = ckpt.latest_step() if step is None and ckpt is not None else step
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
    path = ckpt.directory / str(step)
    saved = ckpt.saved_config(step)
    checkpoint.check_compatible(saved['model'], self.model_cfg, path)
    state, data_state = ckpt.restore(step, self.abstract_state(), self.shardings)
    if resume.data_applies(data_state, self._data_identity, self.config, path):
      train_iter.set_state(data_state.get('iterator', data_state))
    print(f'Resumed from step {step} of {ckpt.directory}.', flush=True)
    return state, train_iter

  def data_state(self, train_iter) -> dict:
    """What a checkpoint keeps of the stream: its position and which data it reads."""
    return {'iterator': train_iter.get_state(), 'source': self._data_identity}

  @functools.cached_property
  def _data_identity(self) -> dict:
    return streams.identity(self.config.data)

  def step(self, state: State, host_batch: dict) -> tuple[State, dict]:
    with sharding.rules_context(self.mesh):
      return self.step_fn(state, sharding.global_batch(host_batch, self.mesh))

  @functools.cached_property
  def _eval_options(self) -> dict:
    tok = streams.tokenizer_of(self.config.data)
    return streams.eval_options(self.config.data, tok, self.model_cfg.vocab_size)

  def evaluate(self, params) -> dict:
    """The eval split's metrics over `eval_steps` batches (<= 0: all), the same as
    `python -m llm.evaluate` reports."""
    c = self.config
    batches = streams.make_iterator(
      streams.Stream.of(c, 'validation', num_epochs=1), self.model_cfg
    )
    try:
      return losses.evaluate(
        self.model_cfg,
        params,
        batches,
        mesh=self.mesh,
        max_batches=max(c.eval_steps, 0),
        **self._eval_options,
      )
    finally:
      if hasattr(batches, 'close'):
        batches.close()


_GUARDED = ('loss', 'grad_norm', 'param_norm')


def _check_finite(rows: list[tuple[int, dict]]) -> None:
  for step, m in rows:
    for name in _GUARDED:
      value = float(m[name])
      if not np.isfinite(value):
        raise FloatingPointError(
          f'The {name} became {value} at step {step}; lower optim.learning_rate, enable '
          'optim.clip_norm or z_loss, or check the data of that step.'
        )


class _Meter:
  """Step metrics kept on device until a log step, then timed, checked and written.

  The first step compiles; its time is kept out of the step time, and so is
  evaluation's (`restart`).
  """

  def __init__(self, trainer: Trainer, writer: metrics_lib.Writer, start: int):
    c = trainer.config
    self._writer, self._start, self._total = writer, start, c.total_steps
    self._dropped = () if trainer.model_cfg.num_experts else moe.STATS  # Zeros when dense.
    self._tokens = c.batch_size * c.seq_len
    self._flops = metrics_lib.train_flops_per_token(trainer.model_cfg, c.seq_len) * self._tokens
    peak = c.peak_flops or metrics_lib.device_peak_flops(trainer.model_cfg.dtype)
    self._peak = peak * jax.device_count()
    self._pending: list[tuple[int, dict]] = []
    self._loop_start = self._last_time = time.perf_counter()
    self._last_step = start
    self._first_step_time = 0.0
    self.last_row: dict = {}

  def add(self, step: int, metrics: dict) -> None:
    self._pending.append((step, metrics))
    if step == self._start + 1:
      jax.block_until_ready(metrics)
      self.restart(step)
      self._first_step_time = self._last_time - self._loop_start
      print(f'Compiled and ran the first step in {self._first_step_time:.1f}s.', flush=True)

  def restart(self, step: int | None = None) -> None:
    self._last_time = time.perf_counter()
    if step is not None:
      self._last_step = step

  def log(self, step: int) -> None:
    pending = jax.device_get(self._pending)
    _check_finite(pending)
    now = time.perf_counter()
    steps = step - self._last_step
    step_time = (now - self._last_time) / steps if steps else self._first_step_time
    self.last_row = {
      **{k: float(v) for k, v in pending[-1][1].items() if k not in self._dropped},
      'step_time': step_time,
      'tokens_per_second': self._tokens / step_time,
      'mfu': self._flops / step_time / self._peak,
    }
    self._writer.write('metrics', step, self.last_row)
    elapsed, done = now - self._loop_start, step - self._start
    print(metrics_lib.progress_line(step, self._total, self.last_row, elapsed, done), flush=True)
    self._pending, self._last_time, self._last_step = [], now, step


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains per `config`, resuming from `workdir`'s newest checkpoint; returns the last row.

  Holds `workdir`'s lock throughout (llm/io/workdir.py). Raises
  `PreemptedError` after saving when SIGTERM arrives.
  """
  workdir_lib.check_trainable(workdir)
  resume.check_init_from(config)
  trainer = Trainer.create(config)
  with workdir_lib.hold(workdir):
    opened = resume.open_run(trainer, workdir)
    if opened is None:
      return {}
    return _loop(trainer, workdir, *opened)


def _loop(trainer: Trainer, workdir: str, ckpt, state, train_iter) -> dict:
  config = trainer.config
  start, total = int(state['step']), config.total_steps
  writer = metrics_lib.Writer(workdir, resume_step=start)
  print(
    f'Training {sum(x.size for x in jax.tree.leaves(state["params"])):,} parameters on mesh '
    f'{dict(trainer.mesh.shape)}, steps {start}..{total}.',
    flush=True,
  )
  meter = _Meter(trainer, writer, start)
  preemption = PreemptionFlag()
  try:
    for step in range(start + 1, total + 1):
      state, m = trainer.step(state, next(train_iter))
      meter.add(step, m)
      done, preempted = step == total, preemption.reached(step)
      if step % config.log_every == 0 or done or preempted:
        meter.log(step)
      if step % config.checkpoint_every == 0 or done or preempted:
        ckpt.save(step, state, trainer.data_state(train_iter), config)
      if preempted:
        ckpt.wait()
        raise PreemptedError(
          f'PreemptedError: saved step {step} in {ckpt.directory}; rerun to resume.'
        )
      if config.eval_every > 0 and (step % config.eval_every == 0 or done):
        eval_row = trainer.evaluate(state['params'])
        writer.write('eval', step, eval_row)
        print(f'eval at step {step}: ' + json.dumps(eval_row), flush=True)
        meter.restart()
  finally:
    preemption.restore()
    ckpt.wait()
    ckpt.close()
    writer.close()
  return meter.last_row


def main(argv):
  del argv
  from absl import flags, logging

  logging.set_verbosity(logging.WARNING)  # Orbax and JAX log every save at INFO.
  if flags.FLAGS.multihost:
    # Cloud TPU VMs: finds the other workers itself. Also sets up the
    # preemption sync point that PreemptionFlag relies on.
    jax.distributed.initialize()
  try:
    train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  except PreemptedError as e:
    print(e, flush=True)
    raise SystemExit(PREEMPTED_EXIT_CODE) from None


if __name__ == '__main__':
  from absl import flags
  from ml_collections import config_flags

  from llm import cli

  config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory for metrics and checkpoints.')
  flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize() (multi-host TPU).')
  flags.mark_flags_as_required(['config', 'workdir'])
  cli.run(main)
