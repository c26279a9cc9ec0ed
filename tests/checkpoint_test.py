"""Checkpoints: exact resume after kill -9 or SIGTERM, crash mid-save, resharding, errors."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from llm import train
from llm.convert import commands
from llm.io import checkpoint, models
from llm.model import ModelConfig
from tests.train_test import _batches, tiny_config

ROOT = Path(__file__).resolve().parents[1]
TOTAL = 16

# A tiny model on the synthetic stream, logged and checkpointed often.
FLAGS = [
  f'--config.total_steps={TOTAL}',
  '--config.log_every=1',
  '--config.checkpoint_every=3',
  '--config.eval_every=0',
  '--config.batch_size=8',
  '--config.seq_len=32',
  '--config.model.vocab_size=128',
  '--config.model.num_layers=2',
  '--config.model.d_model=64',
  '--config.model.num_heads=4',
  '--config.model.num_kv_heads=2',
  '--config.model.d_ff=128',
  '--config.optim.warmup_steps=2',
]


def _start(workdir, *extra):
  cmd = [sys.executable, '-m', 'llm.train', '--config=experiments/synthetic.py']
  cmd += [f'--workdir={workdir}', *FLAGS, *extra]
  return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _run(workdir, *extra):
  proc = _start(workdir, *extra)
  out = proc.communicate(timeout=300)[0].decode()
  assert proc.returncode == 0, out
  return out


def _losses(workdir) -> dict[int, float]:
  rows = [json.loads(x) for x in (Path(workdir) / 'metrics.jsonl').read_text().splitlines()]
  steps = [r['step'] for r in rows]
  assert steps == sorted(set(steps)), f'duplicate or unordered rows: {steps}'
  return {r['step']: r['loss'] for r in rows}


def _wait_for(predicate, proc, timeout=240):
  deadline = time.time() + timeout
  while not predicate():
    assert proc.poll() is None, proc.stdout.read().decode()
    assert time.time() < deadline, 'timed out'
    time.sleep(0.001)


def _logged_step(workdir) -> int:
  path = Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return 0
  lines = path.read_text().splitlines()
  try:
    return json.loads(lines[-1])['step'] if lines else 0
  except json.JSONDecodeError:  # A line being written.
    return 0


def _complete_steps(workdir) -> list[int]:
  """Steps whose save finished: orbax renames a temporary directory to the bare step."""
  ckpt_dir = Path(workdir) / 'checkpoints'
  return [int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()] if ckpt_dir.exists() else []


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('reference')
  _run(workdir)
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, TOTAL + 1))
  return losses


def test_kill_9_at_a_random_step_then_resume_gives_identical_losses(reference, tmp_path):
  kill_after = random.Random(os.getpid()).randint(4, TOTAL - 3)
  proc = _start(tmp_path)
  _wait_for(lambda: _logged_step(tmp_path) >= kill_after and _complete_steps(tmp_path), proc)
  proc.kill()
  proc.wait()
  resumed_from = checkpoint.Checkpointer(str(tmp_path)).latest_step()
  assert resumed_from is not None and resumed_from < TOTAL
  out = _run(tmp_path)
  assert f'Resumed from step {resumed_from}' in out
  assert _losses(tmp_path) == reference  # Bitwise: same data, same optimizer state.


def test_kill_9_during_an_async_save_leaves_no_complete_looking_checkpoint(reference, tmp_path):
  proc = _start(tmp_path)
  ckpt_dir = tmp_path / 'checkpoints'
  # The second save's temporary directory appears: kill while it is written.
  _wait_for(
    lambda: ckpt_dir.exists() and any(p.name.startswith('6.') for p in ckpt_dir.iterdir()),
    proc,
  )
  proc.kill()
  proc.wait()
  complete = checkpoint.Checkpointer(str(tmp_path)).latest_step()
  assert complete in (3, 6)  # 6 only if its rename won the race against the kill.
  out = _run(tmp_path)
  assert f'Resumed from step {complete}' in out
  assert _losses(tmp_path) == reference


def test_sigterm_saves_the_current_step_exits_75_and_resumes_exactly(reference, tmp_path):
  proc = _start(tmp_path)
  _wait_for(lambda: _logged_step(tmp_path) >= 5, proc)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=120)[0].decode()
  assert proc.returncode == train.PREEMPTED_EXIT_CODE, out
  saved = checkpoint.Checkpointer(str(tmp_path)).latest_step()
  assert saved >= 5 and f'saved step {saved}' in out
  assert max(_losses(tmp_path)) == saved
  _run(tmp_path)
  assert _losses(tmp_path) == reference


def _train_in_process(config, workdir, devices, stop_at=None):
  """Like train_and_evaluate on `devices` up to `stop_at`, returning {step: loss}."""
  stop_at = stop_at or config.total_steps
  trainer = train.Trainer.create(config, devices)
  ckpt = checkpoint.Checkpointer(str(workdir), async_save=False)
  state, it = trainer.restore_or_init(ckpt)
  losses = {}
  for step in range(int(state['step']), stop_at):
    state, m = trainer.step(state, next(it))
    losses[step + 1] = float(m['loss'])
  ckpt.save(stop_at, state, it.get_state(), config)
  ckpt.close()
  return losses, state


@pytest.mark.parametrize(
  'mesh, n', [({'mesh.data': 1, 'mesh.fsdp': 4}, 4), ({'mesh.data': 1}, 1)], ids=['fsdp4', 'single']
)
def test_checkpoint_from_a_2x2x2_mesh_restores_onto_another_mesh(tmp_path, mesh, n):
  mesh_222 = {'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2}
  full, _ = _train_in_process(tiny_config(total_steps=5, **mesh_222), tmp_path / 'full', None)
  _train_in_process(tiny_config(total_steps=5, **mesh_222), tmp_path / 'run', None, stop_at=3)
  resumed, state = _train_in_process(
    tiny_config(total_steps=5, **mesh), tmp_path / 'run', jax.devices()[:n]
  )
  assert sorted(resumed) == [4, 5]
  np.testing.assert_allclose([resumed[4], resumed[5]], [full[4], full[5]], rtol=1e-5)
  q = state['params']['layers']['attn']['q']
  assert len(q.sharding.device_set) == n


def test_resuming_with_another_model_shape_names_the_fields(tmp_path):
  _train_in_process(tiny_config(total_steps=2), tmp_path, None)
  # Learning rate and step count may change.
  _train_in_process(tiny_config(total_steps=3, **{'optim.learning_rate': 0.5}), tmp_path, None)
  bad = tiny_config(total_steps=4, **{'model.d_model': 32, 'model.d_ff': 64})
  with pytest.raises(ValueError, match=r'd_model: 64 -> 32, head_dim: 16 -> 8, d_ff: 128 -> 64'):
    _train_in_process(bad, tmp_path, None)


def test_a_corrupt_checkpoint_stops_naming_its_path(tmp_path):
  _train_in_process(tiny_config(total_steps=2), tmp_path, None)
  state_dir = tmp_path / 'checkpoints' / '2' / 'state'
  for f in state_dir.rglob('*'):
    if f.is_file() and f.stat().st_size > 0 and 'manifest' in f.name:
      f.write_bytes(f.read_bytes()[:10])
  for d in state_dir.rglob('d'):
    for f in d.iterdir():
      f.write_bytes(b'garbage')
  with pytest.raises(ValueError, match=r'checkpoints/2 is corrupt or incomplete'):
    _train_in_process(tiny_config(total_steps=4), tmp_path, None)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_params_only_export_loads_without_optimizer_state(tmp_path, dtype):
  c = tiny_config(total_steps=2)
  _, state = _train_in_process(c, tmp_path / 'run', None)
  source = models.open(str(tmp_path / 'run'))
  cfg, params, config = source.model_cfg, source.read(), source.config
  assert cfg == ModelConfig.from_dict(c.model) and config['total_steps'] == 2
  jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(state['params']))
  commands.write_params(str(tmp_path / 'run'), str(tmp_path / 'export'), dtype=dtype)
  assert not (tmp_path / 'export' / 'checkpoints').exists()
  export = models.open(str(tmp_path / 'export'))
  cfg2, exported, none = export.model_cfg, export.read(), export.config
  assert cfg2 == cfg and none is None
  assert all(x.dtype == np.dtype(dtype) for x in jax.tree.leaves(exported))
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(np.float32(a), b, rtol=1e-2), exported, params
  )


def test_a_relative_workdir_saves_and_resumes(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  _train_in_process(tiny_config(total_steps=4), 'run', None, stop_at=2)
  assert checkpoint.Checkpointer('run').latest_step() == 2
  resumed, _ = _train_in_process(tiny_config(total_steps=4), 'run', None)
  assert sorted(resumed) == [3, 4]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match='neither a training workdir'):
    models.open(str(tmp_path))


def test_batches_continue_after_restore():
  # The synthetic stream's state is its step; restoring it continues the stream.
  c = tiny_config()
  first = _batches(c, 5)
  from llm.data import synthetic

  it = synthetic.SyntheticIterator(vocab_size=128, batch_size=8, seq_len=32, seed=0)
  it.set_state({'step': 3})
  np.testing.assert_array_equal(next(it)['inputs'], first[3]['inputs'])


# ----------------------------------------------------------------------------
# Checksums, unreadable checkpoints and resuming from an older step, on a small
# hand-made state (no model to compile).


def _on(shape, spec=()):
  """A NamedSharding on a mesh of all 8 devices of `shape`, as the trainer makes them."""
  mesh = jax.make_mesh(shape, ('a', 'b'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def _state(seed=0):
  """A state tree like a trainer's: its largest array sharded 8 ways, the others replicated."""
  w = jax.random.normal(jax.random.key(seed), (256, 128), jnp.float32)
  state = {
    'params': {'w': w, 'b': jnp.arange(8, dtype=jnp.bfloat16)},
    'opt_state': {'mask': jnp.arange(6) % 2 == 0, 'count': jnp.arange(3, dtype=jnp.int32)},
    'step': jnp.int32(seed),
  }
  return jax.device_put(state, _shardings(state, (8, 1), ('a',)))


def _shardings(state, shape, spec):
  return jax.tree.map(lambda x: _on(shape, spec if x.ndim == 2 else ()), state)


def _save(workdir, *steps):
  ckpt = checkpoint.Checkpointer(str(workdir), keep=0, async_save=False)
  for step in steps:
    ckpt.save(step, _state(step), {'step': step}, ml_collections.ConfigDict({'seed': step}))
  ckpt.close()


def _restore(workdir, step):
  """Restores `step` onto another mesh than the one that saved it."""
  target = _state()
  ckpt = checkpoint.Checkpointer(str(workdir), async_save=False)
  try:
    return ckpt.restore(step, target, _shardings(target, (2, 4), ('b', 'a')))
  finally:
    ckpt.close()


def _one_sentence_error(workdir, step) -> str:
  with pytest.raises(ValueError) as e:
    _restore(workdir, step)
  message = str(e.value)
  assert '\n' not in message and len(message) < 600, message
  assert f'{workdir}/checkpoints/{step} ' in message, message
  return message


def test_checksums_do_not_depend_on_the_sharding_and_see_one_flipped_bit():
  x = _state()['params']['w']
  replicated = jax.device_put(x, _on((8, 1)))
  tensor = jax.device_put(x, _on((2, 4), ('b', 'a')))
  sums = [checkpoint.checksums({'w': y})['w'] for y in (x, replicated, tensor, np.asarray(x))]
  assert all(s == sums[0] for s in sums)
  flipped = np.array(x)
  flipped.view(np.uint32)[100, 7] ^= 1 << 31
  changed = checkpoint.checksums({'w': jax.device_put(flipped, x.sharding)})['w']
  assert changed['checksum'][0] != sums[0]['checksum'][0]
  assert changed['checksum'][1] != sums[0]['checksum'][1]


def test_a_saved_state_restores_verified_onto_another_mesh(tmp_path, capsys):
  _save(tmp_path, 5)
  state, data_state = _restore(tmp_path, 5)
  assert data_state == {'step': 5} and 'without verifying' not in capsys.readouterr().out
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(_state(5)))
  saved = json.loads((tmp_path / 'checkpoints/5/checksums/metadata').read_text())['arrays']
  assert saved['params/w']['shape'] == [256, 128] and saved['opt_state/mask']['dtype'] == 'bool'


def test_a_state_changed_after_saving_is_refused_naming_the_array(tmp_path):
  import orbax.checkpoint as ocp

  _save(tmp_path, 3, 4)
  path = tmp_path / 'checkpoints/4/state'
  with ocp.PyTreeCheckpointer() as orbax:
    raw = orbax.restore(path)
    raw['params']['w'] = np.array(raw['params']['w'])
    raw['params']['w'][17, 3] += 1.0
    orbax.save(path, raw, force=True)  # A valid file, different values.
  message = _one_sentence_error(tmp_path, 4)
  assert 'does not match the checksums it was saved with in params/w,' in message
  assert message.endswith(
    'set --config.resume_step=3 to resume from the previous complete checkpoint, or move it away.'
  )
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state()['params'])
  assert ckpt.restore_params(4, {'b': params['b']})['b'].dtype == jnp.bfloat16  # Intact.
  with pytest.raises(ValueError, match=r'checkpoints/4 does not match .* in params/w, '):
    ckpt.restore_params(4, params)
  ckpt.close()


def _largest_data_file(workdir, step) -> Path:
  files = (workdir / f'checkpoints/{step}/state').rglob('*')
  return max((f for f in files if f.is_file()), key=lambda f: f.stat().st_size)


def test_flipped_bytes_in_a_data_file_are_one_sentence(tmp_path):
  _save(tmp_path, 2)
  f = _largest_data_file(tmp_path, 2)
  data = bytearray(f.read_bytes())
  for i in range(len(data) // 3, len(data) // 3 + 16):
    data[i] ^= 0xFF
  f.write_bytes(bytes(data))
  message = _one_sentence_error(tmp_path, 2)  # Unreadable, or read as other values.
  assert 'start a new workdir' in message


def test_a_truncated_data_file_is_one_sentence(tmp_path):
  _save(tmp_path, 2, 7)
  f = _largest_data_file(tmp_path, 7)
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  message = _one_sentence_error(tmp_path, 7)
  assert 'is corrupt or incomplete (' in message and 'resume_step=2 ' in message


def test_set_aside_after_moves_newer_steps_and_keeps_both_copies(tmp_path):
  _save(tmp_path, 1, 2, 3)
  with pytest.raises(ValueError, match=r'no complete checkpoint at step 4; .* \[1, 2, 3\]'):
    checkpoint.set_aside_after(str(tmp_path), 4)
  assert checkpoint.set_aside_after(str(tmp_path), 1) == [2, 3]
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
  ckpt.close()
  _save(tmp_path, 2)  # Trained again from step 1, then set aside again: nothing is overwritten.
  assert checkpoint.set_aside_after(str(tmp_path), 1) == [2]
  aside = sorted(p.name for p in (tmp_path / 'checkpoints-set-aside').iterdir())
  assert aside == ['2', '2-1', '3']
  assert checkpoint.set_aside_after(str(tmp_path), 1) == []
  assert _restore(tmp_path, 1)[1] == {'step': 1}


def test_a_checkpoint_saved_before_checksums_restores(tmp_path, capsys):
  _save(tmp_path, 6)
  shutil.rmtree(tmp_path / 'checkpoints/6/checksums')
  state, _ = _restore(tmp_path, 6)
  assert int(state['step']) == 6
  assert 'restored without verifying it' in capsys.readouterr().out
