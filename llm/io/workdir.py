"""A training workdir's ownership: what a directory is, and one writer at a time.

Weeks of compute live in a workdir, so `llm.train` writes only into a new or
empty directory or one of its own runs (`check_trainable`), and only while it
holds the workdir's lock (`hold`):

  local paths  DIR/lock.json, exclusively `flock`ed by the job's process 0 for
               the whole run and naming its host, pid and start time. The
               kernel drops the lock when that process dies, however it dies,
               so a lock left by `kill -9` is taken over, with a note, by the
               next run; a live holder is refused in one sentence naming it.
  gs:// paths  DIR/lock.json is a lease: written with a random token, read
               back after a pause to see who won, and renewed by a heartbeat
               thread. A lease whose heartbeat is older than `stale_seconds`
               is taken over with a note. Object stores have no atomic
               create here, so two jobs starting within the pause of each
               other could both see their own token; the pause makes that
               window a few seconds once, not the whole run.

On several hosts only process 0 takes the lock and tells the others whether
it got it, so the processes of one job share it and a second job is refused
on every host. The lock file is removed when the run ends.
"""

import contextlib
import datetime
import fcntl
import json
import os
import secrets
import socket
import threading
import time

import jax
import numpy as np
from etils import epath

LOCK = 'lock.json'
# What a run writes into its workdir; anything else there is the user's.
RUN_ENTRIES = frozenset(
  {
    'checkpoints',
    'checkpoints-set-aside',
    'config.json',
    'eval',
    'eval.jsonl',
    LOCK,
    'metrics.jsonl',
    'tensorboard',
    'tokenizer',
  }
)
_TRAINING_KEYS = {'model', 'optim', 'data', 'total_steps'}


class WorkdirBusyError(OSError):
  """Another job holds the workdir's lock."""


def _is_training_config(path: epath.Path) -> bool:
  try:
    return set(json.loads(path.read_text())) >= _TRAINING_KEYS
  except (ValueError, OSError):
    return False


def foreign_kind(workdir: str) -> str | None:
  """What `workdir` is when it is not a training run's directory, else None.

  A Hugging Face model directory and a params export are the two that get
  mistaken for a workdir (when `init_from` was meant); training into either
  would overwrite its config.json or leave its params shadowing the run's.
  """
  root = epath.Path(workdir)
  if not root.exists():
    return None
  if not root.is_dir():
    return 'a file'
  names = {p.name for p in root.iterdir()}
  if 'model_config.json' in names and 'params' in names:
    return 'a params export'
  config = root / 'config.json'
  if any(n.endswith('.safetensors') for n in names) or (
    'config.json' in names and not _is_training_config(config)
  ):
    return 'a Hugging Face model directory'
  if 'dataset_info.json' in names or 'tokenizers' in names:
    return 'a prepared-data directory'
  visible = {n for n in names if not n.startswith('.')}
  if visible and not visible & RUN_ENTRIES:
    shown = ', '.join(sorted(visible)[:3]) + (', ...' if len(visible) > 3 else '')
    return f'a directory of other files ({shown})'
  return None


def check_trainable(workdir: str) -> None:
  """Stops, before anything is written, when `workdir` belongs to something else."""
  kind = foreign_kind(workdir)
  if kind is None:
    return
  hint = {
    'a params export': '; to fine-tune from it set --config.init_from={0}',
    'a Hugging Face model directory': '; to fine-tune from it set --config.init_from={0}',
    'a prepared-data directory': '; datasets belong in --config.data.data_dir',
  }.get(kind, '')
  raise ValueError(
    f'--workdir={workdir} is {kind}, not a training workdir{hint.format(workdir)}; '
    'give --workdir a new or empty directory (or an earlier run of llm.train).'
  )


def _describe(holder: dict) -> str:
  return (
    f'pid {holder.get("pid", "?")} on host {holder.get("host", "?")} '
    f'(started {holder.get("started", "?")})'
  )


def _holder() -> dict:
  return dict(
    host=socket.gethostname(),
    pid=os.getpid(),
    started=datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
    processes=jax.process_count(),
    token=secrets.token_hex(8),
    heartbeat=time.time(),
  )


class _FileLock:
  """An exclusive `flock` on a local DIR/lock.json (see the module docstring)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK)
    self._fd = None

  def acquire(self) -> None:
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        previous = _read_fd(fd)
        os.close(fd)
        raise WorkdirBusyError(
          f'{os.path.dirname(self.path)} is in use by {_describe(previous)}, which holds '
          f'{self.path}; wait for it to finish or give another --workdir.'
        ) from None
      # The holder before us may have removed the file between our open and our lock.
      if not os.path.exists(self.path) or os.stat(self.path).st_ino != os.fstat(fd).st_ino:
        os.close(fd)
        continue
      break
    previous = _read_fd(fd)
    if previous:
      print(f'Took over the stale lock of {_describe(previous)}: it is gone.', flush=True)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_holder()).encode(), 0)
    os.fsync(fd)
    self._fd = fd

  def release(self) -> None:
    if self._fd is None:
      return
    os.unlink(self.path)
    os.close(self._fd)
    self._fd = None


def _read_fd(fd: int) -> dict:
  try:
    return json.loads(os.pread(fd, 1 << 16, 0) or b'{}')
  except ValueError:
    return {}


class _Lease:
  """A heartbeat lease object for storage without file locks (gs://)."""

  def __init__(self, workdir: str, *, heartbeat_seconds=30.0, stale_seconds=300.0, settle=3.0):
    self.path = epath.Path(workdir) / LOCK
    self._heartbeat, self._stale, self._settle = heartbeat_seconds, stale_seconds, settle
    self._me: dict | None = None
    self._stop = threading.Event()
    self._thread = None

  def _read(self) -> dict:
    try:
      return json.loads(self.path.read_text())
    except (FileNotFoundError, ValueError):
      return {}

  def acquire(self) -> None:
    previous = self._read()
    age = time.time() - float(previous.get('heartbeat', 0))
    if previous and age < self._stale:
      raise WorkdirBusyError(
        f'{self.path.parent} is in use by {_describe(previous)}, whose lease {self.path} was '
        f'renewed {age:.0f}s ago; wait for it to finish or give another --workdir.'
      )
    self._me = _holder()
    self.path.write_text(json.dumps(self._me))
    time.sleep(self._settle)
    winner = self._read()
    if winner.get('token') != self._me['token']:
      raise WorkdirBusyError(
        f'{self.path.parent} was just taken by {_describe(winner)}; give another --workdir.'
      )
    if previous:
      print(
        f'Took over the stale lease of {_describe(previous)}: no heartbeat for {age:.0f}s.',
        flush=True,
      )
    self._thread = threading.Thread(target=self._beat, daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(self._heartbeat):
      if self._read().get('token') != self._me['token']:
        print(f'Warning: the lease {self.path} was taken by another job.', flush=True)
        return
      self._me['heartbeat'] = time.time()
      self.path.write_text(json.dumps(self._me))

  def release(self) -> None:
    if self._me is None:
      return
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if self._read().get('token') == self._me['token']:
      self.path.unlink()
    self._me = None


def make_lock(workdir: str, **lease_options):
  """The lock kind for `workdir`'s storage: a file lock locally, a lease on gs://."""
  if '://' in str(workdir):
    return _Lease(workdir, **lease_options)
  return _FileLock(workdir)


@contextlib.contextmanager
def hold(workdir: str, **lease_options):
  """Holds `workdir` for one job while the block runs.

  A missing workdir is created, and removed again if the run left nothing in
  it (a check failed before any work), so a refused run leaves no trace.
  """
  lock = make_lock(workdir, **lease_options) if jax.process_index() == 0 else None
  root = epath.Path(workdir)
  created = lock is not None and not root.exists()
  error = None
  if lock is not None:
    root.mkdir(parents=True, exist_ok=True)
    try:
      lock.acquire()
    except WorkdirBusyError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if failed and error is None:
      error = WorkdirBusyError(f'Process 0 could not lock {workdir}; see its output.')
  if error is not None:
    raise error
  try:
    yield
  finally:
    if lock is not None:
      lock.release()
      if created and not any(root.iterdir()):
        root.rmdir()
