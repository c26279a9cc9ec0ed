"""The optimizer: AdamW with decoupled weight decay, clipping, and LR schedules.

Gradient accumulation is not here: it happens in `train.train_step` with a
`lax.scan` over microbatches, so one optimizer update sees the mean gradient of
the whole batch and no accumulator lives in the optimizer state.
"""

import jax
import optax

SCHEDULES = ('cosine', 'linear', 'constant', 'wsd')

_NORM_OR_BIAS = ('scale', 'bias')
_EMBEDDINGS = ('embedding', 'pos_embedding')


def make_schedule(c, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `c.learning_rate`, then the decay `c.schedule`.

  cosine / linear decay to `min_lr_ratio * learning_rate` at `total_steps`;
  wsd (warmup-stable-decay) holds the peak and decays linearly over the last
  `decay_fraction` of the steps after warmup.
  """
  if c.schedule not in SCHEDULES:
    raise ValueError(f'optim.schedule={c.schedule!r} is not one of {", ".join(SCHEDULES)}.')
  lr, warmup = c.learning_rate, int(c.warmup_steps)
  if warmup < 0 or warmup > total_steps:
    raise ValueError(f'optim.warmup_steps={warmup} must be in [0, total_steps={total_steps}].')
  rest = max(total_steps - warmup, 1)
  end = lr * c.min_lr_ratio
  if c.schedule == 'cosine':
    main = optax.cosine_decay_schedule(lr, rest, alpha=c.min_lr_ratio)
  elif c.schedule == 'linear':
    main = optax.linear_schedule(lr, end, rest)
  elif c.schedule == 'constant':
    main = optax.constant_schedule(lr)
  else:
    decay = max(int(rest * c.decay_fraction), 1)
    main = optax.join_schedules(
      [optax.constant_schedule(lr), optax.linear_schedule(lr, end, decay)], [rest - decay]
    )
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def decay_mask(c, params):
  """True for weights that get weight decay: matmul kernels by default.

  Norm scales, biases and embedding tables are left alone unless configured:
  decaying them pulls activations' scale or rare tokens' vectors toward 0 with
  no regularising benefit.
  """

  def decide(path, _):
    name = path[-1].key
    if name in _NORM_OR_BIAS or name.endswith('_bias'):
      return bool(c.decay_norms_and_biases)
    if name in _EMBEDDINGS:
      return bool(c.decay_embeddings)
    return True

  return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(c, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optax chain for `config.optim` and its learning-rate schedule."""
  schedule = make_schedule(c, total_steps)
  adamw = optax.adamw(
    schedule,
    b1=c.b1,
    b2=c.b2,
    eps=c.eps,
    weight_decay=c.weight_decay,
    mask=lambda params: decay_mask(c, params),
  )
  if c.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(c.clip_norm), adamw), schedule
  return adamw, schedule
