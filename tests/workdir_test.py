"""The workdir's promises (docs/workdir.md), each shown the way it matters: by real processes.

One writer at a time (a second `llm.train` is refused within seconds while
the first finishes intact; a lock left by `kill -9` is taken over); a corrupt
checkpoint is refused naming its step, and an older one is resumed only on
request; a finished run has nothing to do and rewrites nothing. The lock and
the lease themselves, and what counts as someone else's directory, are
tested in-process.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from llm.io import workdir

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _train_cmd(config: pathlib.Path, run: pathlib.Path, steps: int, *extra: str) -> list[str]:
  return [
    sys.executable,
    '-m',
    'llm.train',
    f'--config={config}:{steps}',
    f'--workdir={run}',
    *extra,
  ]


def _train(config, run, steps, *extra) -> subprocess.CompletedProcess:
  return subprocess.run(
    _train_cmd(config, run, steps, *extra), cwd=ROOT, capture_output=True, text=True, timeout=600
  )


def _start(config, run, steps, *extra) -> subprocess.Popen:
  return subprocess.Popen(
    _train_cmd(config, run, steps, *extra),
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _wait_for(path: pathlib.Path, proc: subprocess.Popen, timeout: float = 300) -> None:
  end = time.time() + timeout
  while not path.exists():
    assert proc.poll() is None, proc.communicate()
    assert time.time() < end, f'{path} never appeared'
    time.sleep(0.2)


def _error_line(run) -> str:
  assert run.returncode != 0, run.stdout + run.stderr
  assert 'Traceback' not in run.stderr, run.stderr
  return run.stderr.strip().splitlines()[-1]


@pytest.fixture
def tiny():
  return ROOT / 'tests' / 'tiny_experiment.py'


def test_a_second_writer_is_refused_and_the_first_finishes_intact(tiny, tmp_path):
  run = tmp_path / 'run'
  steps = 1500
  first = _start(tiny, run, steps, '--config.log_every=100', '--config.checkpoint_every=500')
  _wait_for(run / 'metrics.jsonl', first)
  start = time.time()
  second = _train(tiny, run, steps)
  refused_in = time.time() - start
  line = _error_line(second)
  assert f'pid {first.pid}' in line and 'lock.json' in line, line
  assert first.poll() is None, 'the first run ended before the second was refused'
  assert refused_in < 60, refused_in
  out, err = first.communicate(timeout=600)
  assert first.returncode == 0, err
  rows = [json.loads(r) for r in (run / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows] == list(range(100, steps + 1, 100))
  assert sorted(int(p.name) for p in (run / 'checkpoints').iterdir()) == [500, 1000, 1500]
  assert not (run / 'lock.json').exists()


def test_a_lock_left_by_kill_9_is_taken_over(tiny, tmp_path):
  run = tmp_path / 'run'
  first = _start(tiny, run, 100000, '--config.checkpoint_every=100000')
  _wait_for(run / 'metrics.jsonl', first)
  os.kill(first.pid, signal.SIGKILL)
  first.wait()
  assert str(first.pid) in (run / 'lock.json').read_text()
  second = _train(tiny, run, 4)
  assert second.returncode == 0, second.stderr
  assert f'Took over the stale lock of pid {first.pid}' in second.stdout
  assert (run / 'checkpoints' / '4').exists()
  assert not (run / 'lock.json').exists()


def _flip_bytes(step_dir: pathlib.Path) -> None:
  """Flips a byte in every KiB of each of the step's array data files.

  Spread out, because an OCDBT data file may also hold bytes no array reads;
  and in every file of 4 KiB or more (the arrays; the B-tree's nodes are
  smaller), because which file holds the params (all that `llm.generate`
  reads) rather than the optimizer state varies from save to save.
  """
  files = [p for p in (step_dir / 'state').rglob('*') if p.is_file()]
  files = [p for p in files if p.parent.name == 'd' and p.stat().st_size >= 4096]
  assert files, sorted(str(p) for p in (step_dir / 'state').rglob('*'))
  for target in files:
    data = bytearray(target.read_bytes())
    for i in range(512, len(data), 1024):
      data[i] ^= 0xFF
    target.write_bytes(bytes(data))


def test_a_corrupt_checkpoint_is_refused_and_an_older_one_resumed_on_request(tiny, tmp_path):
  run = tmp_path / 'run'
  assert _train(tiny, run, 4).returncode == 0
  _flip_bytes(run / 'checkpoints' / '4')
  config_before = (run / 'config.json').read_bytes()

  refused = _error_line(_train(tiny, run, 6))
  assert f'{run}/checkpoints/4' in refused and 'resume_step=2' in refused, refused
  assert (run / 'config.json').read_bytes() == config_before
  sample = subprocess.run(
    [sys.executable, '-m', 'llm.generate', f'--workdir={run}', '--prompt=a', '--tokenizer=byte'],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert f'{run}/checkpoints/4' in _error_line(sample)

  resumed = _train(tiny, run, 6, '--config.resume_step=2')
  assert resumed.returncode == 0, resumed.stderr
  assert 'Resumed from step 2' in resumed.stdout
  assert (run / 'checkpoints-set-aside' / '4').exists()
  assert sorted(int(p.name) for p in (run / 'checkpoints').iterdir()) == [2, 4, 6]
  # The flag left on the command line does not roll the run back again.
  again = _train(tiny, run, 8, '--config.resume_step=2')
  assert again.returncode == 0, again.stderr
  assert 'Resumed from step 6' in again.stdout, again.stdout
  assert sorted(int(p.name) for p in (run / 'checkpoints-set-aside').iterdir()) == [4]


def test_a_finished_run_has_nothing_to_do_and_rewrites_nothing(tiny, tmp_path):
  run = tmp_path / 'run'
  assert _train(tiny, run, 4).returncode == 0
  before = {p: p.read_bytes() for p in run.rglob('*') if p.is_file()}
  again = _train(tiny, run, 4, '--config.optim.learning_rate=0.5')
  assert again.returncode == 0, again.stderr
  assert 'already at step 4 ≥ total_steps=4; nothing to do' in again.stdout
  assert {p: p.read_bytes() for p in run.rglob('*') if p.is_file()} == before


# ----------------------------------------------------------------------------
# In-process: the lock kinds and what a workdir may be.


def test_a_held_file_lock_refuses_another_holder(tmp_path):
  first = workdir.make_lock(str(tmp_path))
  first.acquire()
  with pytest.raises(workdir.WorkdirBusyError, match=f'pid {os.getpid()}'):
    workdir.make_lock(str(tmp_path)).acquire()
  first.release()
  assert not (tmp_path / workdir.LOCK).exists()
  again = workdir.make_lock(str(tmp_path))
  again.acquire()
  again.release()


def test_a_lease_refuses_while_renewed_and_is_taken_over_when_stale(tmp_path, capsys):
  lease = workdir._Lease(str(tmp_path), heartbeat_seconds=0.1, stale_seconds=60, settle=0.1)
  lease.acquire()
  time.sleep(0.3)  # A few heartbeats.
  with pytest.raises(workdir.WorkdirBusyError, match='renewed'):
    workdir._Lease(str(tmp_path), stale_seconds=60, settle=0.1).acquire()
  lease.release()
  assert not (tmp_path / workdir.LOCK).exists()

  stale = {'host': 'gone', 'pid': 1, 'started': 'then', 'token': 'x', 'heartbeat': 0}
  (tmp_path / workdir.LOCK).write_text(json.dumps(stale))
  taker = workdir._Lease(str(tmp_path), stale_seconds=60, settle=0.1)
  taker.acquire()
  assert 'Took over the stale lease of pid 1 on host gone' in capsys.readouterr().out
  taker.release()


def test_what_a_directory_is(tmp_path):
  assert workdir.foreign_kind(str(tmp_path / 'new')) is None
  assert workdir.foreign_kind(str(tmp_path)) is None  # Empty.
  hf = tmp_path / 'hf'
  hf.mkdir()
  (hf / 'config.json').write_text('{"model_type": "gpt2"}')
  assert workdir.foreign_kind(str(hf)) == 'a Hugging Face model directory'
  export = tmp_path / 'export'
  (export / 'params').mkdir(parents=True)
  (export / 'model_config.json').write_text('{}')
  assert workdir.foreign_kind(str(export)) == 'a params export'
  run = tmp_path / 'run'
  run.mkdir()
  (run / 'config.json').write_text('{"model": {}, "optim": {}, "data": {}, "total_steps": 1}')
  (run / 'notes.txt').write_text('mine')
  assert workdir.foreign_kind(str(run)) is None
  with pytest.raises(ValueError, match='init_from'):
    workdir.check_trainable(str(hf))
