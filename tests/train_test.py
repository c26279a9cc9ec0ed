"""Training: sharded equals unsharded, shardings follow the rules, accumulation, loss falls."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from llm import config as config_lib
from llm import metrics, train
from llm.data import synthetic
from llm.model import ModelConfig


def tiny_config(**overrides):
  c = config_lib.get_config()
  c.model = config_lib.model_config(
    vocab_size=128, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, d_ff=128
  )
  c.batch_size = 8
  c.seq_len = 32
  c.total_steps = 4
  c.log_every = 1
  c.eval_every = 0
  c.optim.warmup_steps = 1
  c.optim.learning_rate = 1e-2
  for k, v in overrides.items():
    target = c
    *path, last = k.split('.')
    for p in path:
      target = target[p]
    target[last] = v
  return c


def _batches(c, n):
  it = synthetic.SyntheticIterator(
    vocab_size=c.model.vocab_size, batch_size=c.batch_size, seq_len=c.seq_len, seed=0
  )
  return [next(it) for _ in range(n)]


def _jsonl(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def _losses(c, devices, n=3):
  trainer = train.Trainer.create(c, devices)
  state = trainer.init_state()
  out = []
  for b in _batches(c, n):
    state, m = trainer.step(state, b)
    out.append(float(m['loss']))
  return trainer, state, out


def test_data_fsdp_tensor_mesh_gives_the_same_losses_as_one_device():
  sharded = tiny_config(**{'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2})
  single = tiny_config(**{'mesh.data': 1})
  _, _, losses_8 = _losses(sharded, jax.devices())
  _, _, losses_1 = _losses(single, jax.devices()[:1])
  np.testing.assert_allclose(losses_8, losses_1, rtol=2e-5)
  assert losses_8[-1] < losses_8[0]


def test_parameters_and_optimizer_state_are_sharded_as_the_rules_say():
  c = tiny_config(**{'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2})
  trainer, state, _ = _losses(c, jax.devices(), n=1)
  params = state['params']
  fsdp = ('fsdp', 'sequence', 'expert')  # sequence and expert split it elsewhere.
  expected = {
    'embedding': P('tensor', fsdp),
    'unembed': P(fsdp, 'tensor'),
    'layers/attn/q': P(None, fsdp, 'tensor', None),
    'layers/attn/k': P(None, fsdp, 'tensor', None),
    'layers/attn/o': P(None, 'tensor', None, fsdp),
    'layers/mlp/wi': P(None, fsdp, 'tensor'),
    'layers/mlp/wo': P(None, 'tensor', fsdp),
    'layers/attn_norm/scale': P(None, None),
  }
  for name, spec in expected.items():
    leaf = params
    for key in name.split('/'):
      leaf = leaf[key]
    assert leaf.sharding.spec == spec, name
    # Each device holds only its shard.
    shard = leaf.addressable_shards[0].data
    axes = [a for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry)]
    assert shard.size == leaf.size // np.prod([c.mesh.get(a, 1) for a in axes] or [1])

  adam = state['opt_state'][1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState
  for moments in (adam.mu, adam.nu):
    flat_p = jax.tree_util.tree_leaves_with_path(params)
    flat_m = jax.tree.leaves(moments)
    for (path, p), m in zip(flat_p, flat_m, strict=True):
      assert m.sharding.spec == p.sharding.spec, jax.tree_util.keystr(path)
  assert adam.count.sharding.spec == P()


def test_gradient_accumulation_equals_one_step_over_the_whole_batch():
  one = tiny_config(**{'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2})
  accum = tiny_config(**{'mesh.data': 2, 'mesh.fsdp': 1, 'mesh.tensor': 2, 'optim.grad_accum': 4})
  _, state_1, losses_1 = _losses(one, jax.devices())
  _, state_4, losses_4 = _losses(accum, jax.devices()[:4])
  np.testing.assert_allclose(losses_1, losses_4, rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4),
    state_1['params'],
    state_4['params'],
  )


def test_synthetic_loss_falls_clearly_within_a_few_dozen_steps(tmp_path):
  c = tiny_config(total_steps=40, log_every=10, eval_every=40, eval_steps=2)
  c.optim.warmup_steps = 5
  c.data.synthetic_num_sequences = 16
  train.train_and_evaluate(c, str(tmp_path))
  rows = _jsonl(tmp_path / 'metrics.jsonl')
  assert [r['step'] for r in rows] == [10, 20, 30, 40]
  for key in ('loss', 'learning_rate', 'grad_norm', 'param_norm', 'tokens_per_second', 'mfu'):
    assert all(np.isfinite(r[key]) for r in rows), key
  uniform = np.log(c.model.vocab_size)
  assert rows[0]['loss'] < uniform
  assert rows[-1]['loss'] < 0.6 * uniform, [r['loss'] for r in rows]
  evals = _jsonl(tmp_path / 'eval.jsonl')
  assert evals[-1]['step'] == 40 and evals[-1]['loss'] < 0.6 * uniform
  assert json.loads((tmp_path / 'config.json').read_text())['model']['d_model'] == 64
  assert list((tmp_path / 'tensorboard').iterdir())


def test_nan_loss_stops_the_run_naming_the_step(tmp_path):
  c = tiny_config(total_steps=6, log_every=3)
  c.optim.learning_rate = 1e30
  c.optim.clip_norm = 0.0
  with pytest.raises(FloatingPointError, match=r'at step \d'):
    train.train_and_evaluate(c, str(tmp_path))


@pytest.mark.parametrize(
  'overrides, message',
  [
    ({'mesh.data': 3}, r'needs 3 devices, but there are 8'),
    ({'mesh.data': -1, 'mesh.fsdp': 3}, r'3 does not divide 8'),
    (
      {'mesh.data': 1, 'mesh.tensor': 8, 'model.num_heads': 4, 'model.num_kv_heads': 4},
      r'model.num_heads=4 is not divisible by mesh tensor=8',
    ),
    ({'model.num_kv_heads': 3}, r'num_kv_heads=3 must divide model.num_heads=4'),
    ({'batch_size': 6}, r'batch_size=6 must be divisible'),
    ({'optim.schedule': 'exp'}, r"optim.schedule='exp' is not one of"),
  ],
)
def test_bad_configs_stop_with_one_clear_sentence(overrides, message):
  with pytest.raises(ValueError, match=message):
    train.Trainer.create(tiny_config(**overrides))


def test_unknown_config_key_is_named():
  c = tiny_config()
  c.optim.learning_rat = 0.1
  with pytest.raises(ValueError, match=r"Unknown config key 'optim.learning_rat'"):
    train.Trainer.create(c)


def test_flops_formula_counts_matmuls_and_causal_attention():
  cfg = ModelConfig(vocab_size=100, num_layers=3, d_model=16, num_heads=4, num_kv_heads=2, d_ff=40)
  H = 4
  per_layer = 16 * 4 * H * 2 + 16 * 2 * H * 2 + 16 * 40 * 3
  assert metrics.matmul_params(cfg) == 3 * per_layer + 16 * 100
  T = 64
  assert metrics.train_flops_per_token(cfg, T) == 6 * (3 * per_layer + 1600) + 6 * 3 * T * 4 * H
  # GPT-2 124M at T=1024: 6N + attention, N without embedding lookups (PaLM's count).
  gpt2 = ModelConfig(
    vocab_size=50257,
    num_layers=12,
    d_model=768,
    num_heads=12,
    num_kv_heads=12,
    d_ff=3072,
    mlp='gelu',
  )
  assert metrics.matmul_params(gpt2) == 12 * (4 * 768 * 768 + 2 * 768 * 3072) + 768 * 50257
