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


def exit_with_parent(worker_index: int = 0, worker_count: int = 0) -> None:
  """grain `worker_init_fn`: exits this process once its parent has gone."""
  del worker_index, worker_count
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:
      time.sleep(POLL_SECONDS)
    os._exit(1)  # pylint: disable=protected-access  (no cleanup: the parent is gone)

  threading.Thread(target=watch, name="exit_with_parent", daemon=True).start()
