"""Preemption notices (SIGTERM): every process learns of them at the same step.

A cluster scheduler (GCE/TPU maintenance, SLURM `--signal`, Kubernetes) sends SIGTERM some
time before it kills a job. The loop asks `PreemptionWatcher.reached(step)` after every
step; when it answers True the loop saves a checkpoint at that step and exits cleanly.

Two mechanisms, because `jax.distributed.initialize` installs JAX's preemption service,
which takes SIGTERM for itself:
  - multi-process: JAX's sync manager spreads the notice of any one process to all of
    them and picks a common step (`multihost_utils.reached_preemption_sync_point`), so
    every process joins the same collective save. It needs every process to ask at
    every step, counting from the same step; the common step is the one after the
    furthest any process had reported when the notice spread, so a run stops a step or
    two after the signal. A scheduler may signal one process or all of them;
  - single process: our own SIGTERM handler sets a flag (the previous handler is restored
    by `close()`).
"""

import logging
import signal
import threading

import jax
from jax.experimental import multihost_utils


class PreemptionWatcher:
  """`reached(step)`: True once a preemption notice has arrived (at a common step)."""

  def __init__(self):
    self._event = threading.Event()
    self._previous = None
    self.distributed = jax.process_count() > 1
    # With jax_enable_preemption_service=False there is no sync manager to ask, and
    # asking would fail the run at its first step: go on without notices instead (every
    # process has the same setting, so all of them go on alike).
    self._service_off = self.distributed and not jax.config.jax_enable_preemption_service
    if self._service_off:
      logging.warning("jax_enable_preemption_service is off: SIGTERM will not save a "
                      "checkpoint in this multi-process run")
    if not self.distributed and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame):
    del frame
    logging.warning("signal %d: saving a checkpoint after the current step", signum)
    self._event.set()

  def notify(self) -> None:
    """Marks a preemption as if SIGTERM had arrived (single process; tests)."""
    self._event.set()

  def reached(self, step: int) -> bool:
    """Call after every step with the step number; all processes answer alike."""
    if self._service_off:
      return False
    if self.distributed:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._event.is_set()

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
