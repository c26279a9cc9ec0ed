"""Load balancing: the Switch auxiliary loss spreads tokens that the router alone piles up.

A one-layer mixture of 8 experts (top 2, capacity factor 1.25) on a synthetic
stream of 16 token types, trained twice from the same init on the same
batches, the auxiliary loss on and off. The sparse layer sees little more
than the token's type, so its routing is a map from 16 types to pairs of
experts; the language-model gradient alone moves the router towards a few
experts (measured: the busiest expert gets ~3.4x the mean load, half the
token copies overflow), while the auxiliary loss keeps the load near even.
The test checks both sides, so a loss whose gradient never reaches the
router (or a routing that is even by construction) fails it.
"""

import jax
import numpy as np
import pytest

from llm import config as config_lib
from llm import train
from llm.data import streams

STEPS, LAST = 150, 20


def _config(moe_aux_loss: float):
  c = config_lib.get_config()
  c.data.dataset = 'synthetic'
  c.data.synthetic_num_sequences = 256
  c.model = config_lib.model_config(
    vocab_size=16,
    num_layers=1,
    d_model=32,
    num_heads=2,
    num_kv_heads=2,
    d_ff=64,
    max_seq_len=32,
    num_experts=8,
    experts_per_token=2,
    moe_d_ff=32,
    capacity_factor=1.25,
  )
  c.batch_size, c.seq_len, c.total_steps = 16, 32, STEPS
  c.log_every, c.eval_every, c.checkpoint_every = 1, 0, STEPS
  c.optim.learning_rate, c.optim.warmup_steps = 1e-2, 5
  c.moe_aux_loss = moe_aux_loss
  return c


def _run(moe_aux_loss: float) -> list[dict]:
  """The train step's metrics at every step, on one device (8 fake ones are 6x slower)."""
  trainer = train.Trainer.create(_config(moe_aux_loss), jax.devices()[:1])
  state = trainer.init_state()
  batches = streams.make_iterator(streams.Stream.of(trainer.config, 'train'), trainer.model_cfg)
  rows = []
  for _ in range(STEPS):
    state, m = trainer.step(state, next(batches))
    rows.append({k: float(v) for k, v in m.items()})
  return rows


def _late(rows: list[dict], key: str) -> float:
  return float(np.mean([r[key] for r in rows[-LAST:]]))


@pytest.fixture(scope='module')
def runs():
  return {'on': _run(0.01), 'off': _run(0.0)}


def test_both_runs_start_from_the_same_routing(runs):
  on, off = runs['on'], runs['off']
  assert len(on) == len(off) == STEPS
  for key in ('expert_load_max_over_mean', 'dropped_fraction', 'moe_aux_loss'):
    assert on[0][key] == pytest.approx(off[0][key], rel=1e-5), key


def test_without_the_aux_loss_the_router_piles_tokens_onto_few_experts(runs):
  off = runs['off']
  assert _late(off, 'expert_load_max_over_mean') > 2.5
  assert _late(off, 'dropped_fraction') > 0.3
  assert _late(off, 'moe_aux_loss') > 1.3  # The loss sees the imbalance it is not asked to fix.


def test_the_aux_loss_keeps_the_load_near_even_and_drops_fewer_tokens(runs):
  on, off = runs['on'], runs['off']
  load_on, load_off = (_late(r, 'expert_load_max_over_mean') for r in (on, off))
  dropped_on, dropped_off = (_late(r, 'dropped_fraction') for r in (on, off))
  assert load_on < 1.75 and load_on < 0.6 * load_off, (load_on, load_off)
  assert dropped_on < 0.5 * dropped_off, (dropped_on, dropped_off)
  assert _late(on, 'moe_aux_loss') < 1.1
  # Balancing costs the language model nothing measurable here.
  assert _late(on, 'loss') < _late(off, 'loss') + 0.05
