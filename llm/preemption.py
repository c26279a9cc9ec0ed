"""Preemption: SIGTERM (what a preempted TPU VM gets) becomes a save and a retryable exit.

The flag is checked between steps; the loop saves that step, then raises
`PreemptedError`, and `python -m llm.train` exits with PREEMPTED_EXIT_CODE so
that a supervisor (tpu_setup/babysit.sh) reruns it, which resumes.
"""

import signal
import threading

import jax

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: the job may be retried and will resume.


class PreemptedError(Exception):
  """Raised after the state was saved on SIGTERM; the run resumes from that step."""


class PreemptionFlag:
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
