"""Checkpoints of a mixture of experts: exact resume after kill -9, and onto another expert axis."""

import json
import os
import random
from pathlib import Path

import jax
import numpy as np

from llm.io import checkpoint
from tests import checkpoint_test as ckpt_test
from tests.train_test import tiny_config

MOE = {
  'model.num_experts': 4,
  'model.experts_per_token': 2,
  'model.moe_d_ff': 64,
  'model.capacity_factor': 1.25,
}
FLAGS = [f'--config.{k}={v}' for k, v in MOE.items()] + [
  '--config.mesh.data=2',
  '--config.mesh.expert=4',
]


def test_kill_9_then_resume_gives_identical_losses_and_routing(tmp_path):
  reference_dir = tmp_path / 'reference'
  ckpt_test._run(reference_dir, *FLAGS)
  rows = [json.loads(x) for x in (reference_dir / 'metrics.jsonl').read_text().splitlines()]
  assert all('expert_load_max_over_mean' in r and 'dropped_fraction' in r for r in rows)
  run = tmp_path / 'run'
  kill_after = random.Random(os.getpid()).randint(4, ckpt_test.TOTAL - 3)
  proc = ckpt_test._start(run, *FLAGS)
  ckpt_test._wait_for(
    lambda: ckpt_test._logged_step(run) >= kill_after and ckpt_test._complete_steps(run), proc
  )
  proc.kill()
  proc.wait()
  resumed_from = checkpoint.Checkpointer(str(run)).latest_step()
  assert resumed_from is not None and resumed_from < ckpt_test.TOTAL
  assert f'Resumed from step {resumed_from}' in ckpt_test._run(run, *FLAGS)
  resumed = [json.loads(x) for x in (run / 'metrics.jsonl').read_text().splitlines()]
  keys = ('loss', 'moe_aux_loss', 'router_z_loss', 'dropped_fraction')
  assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in rows]


def test_a_checkpoint_from_expert_4_restores_onto_expert_1(tmp_path):
  expert_4 = {'mesh.data': 2, 'mesh.expert': 4}
  c = tiny_config(total_steps=5, **MOE, **expert_4)
  full, _ = ckpt_test._train_in_process(c, tmp_path / 'full', None)
  ckpt_test._train_in_process(c, tmp_path / 'run', None, stop_at=3)
  one = tiny_config(total_steps=5, **MOE, **{'mesh.data': 1})
  resumed, state = ckpt_test._train_in_process(one, tmp_path / 'run', jax.devices()[:1])
  assert sorted(resumed) == [4, 5]
  np.testing.assert_allclose([resumed[4], resumed[5]], [full[4], full[5]], rtol=1e-5)
  wi = state['params']['layers']['moe']['wi']
  assert len(wi.sharding.device_set) == 1 and wi.shape[1] == MOE['model.num_experts']
  assert Path(tmp_path / 'run' / 'checkpoints').exists()
