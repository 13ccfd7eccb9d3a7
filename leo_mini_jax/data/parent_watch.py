"""grain worker processes end when the process that started them dies.

A SIGKILL (or the OOM killer) gives the train process no chance to stop its grain
workers; they were left running under init with their memory, and so was
multiprocessing's resource tracker (it exits once no process holds its pipe). Each
worker runs `exit_with_parent` at start: a daemon thread that ends the worker as soon
as it is re-parented. Polling the parent pid, rather than PR_SET_PDEATHSIG, because a
parent-death signal fires when the *thread* that started the worker exits, and grain
may start workers from a thread that does not live as long as the run.
"""

import os
import threading
import time

POLL_SECONDS = 0.5


PARENT_ENV = "LEO_MINI_DATA_PARENT_PID"


def announce_parent() -> None:
  """Records this process as the workers' parent in the environment they inherit.

  A worker runs `exit_with_parent` only after its imports (seconds under load); if the
  parent dies before that, the worker's own getppid() already names its new parent, so
  the worker compares with the pid recorded here instead.
  """
  os.environ[PARENT_ENV] = str(os.getpid())


def exit_with_parent(worker_index: int = 0, worker_count: int = 0) -> None:
  """grain `worker_init_fn`: exits this process once its parent has gone."""
  del worker_index, worker_count
  parent = int(os.environ.get(PARENT_ENV, os.getppid()))
  if os.getppid() != parent:  # the parent died while this worker was starting
    os._exit(1)  # pylint: disable=protected-access

  def watch():
    while os.getppid() == parent:
      time.sleep(POLL_SECONDS)
    os._exit(1)  # pylint: disable=protected-access  (no cleanup: the parent is gone)

  threading.Thread(target=watch, name="exit_with_parent", daemon=True).start()
