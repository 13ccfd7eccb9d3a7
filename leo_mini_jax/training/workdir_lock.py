"""One training run per workdir: `<workdir>/train.lock`, held for the run's lifetime.

Two runs on one workdir collide on a save and interleave metrics.jsonl rows. The lock
is an exclusive `flock` on a file that also names the holder (pid, host, start time):
the kernel releases a flock when its process dies, however it dies, so the lock of a
killed run is stale by construction and the next run takes it over without a timeout
or a pid check (pids are reused). A second run on a held workdir stops at start naming
the holder.

Only process 0 locks, and only local (or NFS-mounted) workdirs: object stores (gs://,
s3://) have no locks, and a warning says so.
"""

import fcntl
import json
import logging
import os
import socket
import time

from etils import epath

LOCK_NAME = "train.lock"


class WorkdirLockedError(RuntimeError):
  """Another live run holds the workdir."""


class WorkdirLock:
  """Holds `<workdir>/train.lock` from `acquire()` to `release()`."""

  def __init__(self, workdir: str):
    self.path = epath.Path(workdir) / LOCK_NAME
    self.file = None

  def acquire(self) -> "WorkdirLock":
    if "://" in str(self.path):
      logging.warning("%s: object stores have no locks; make sure no other run uses "
                      "this workdir", self.path.parent)
      return self
    self.path.parent.mkdir(parents=True, exist_ok=True)
    # Not "w": truncating would erase the holder's name before we know it is ours.
    handle = open(self.path, "a+", encoding="utf-8")
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      holder = _describe(handle.read())
      handle.close()
      raise WorkdirLockedError(
          f"{self.path.parent} is in use by another training run ({holder}); stop it or "
          "choose another --workdir") from None
    handle.seek(0)
    previous = handle.read().strip()
    if previous:
      logging.warning("%s: taking over the stale lock of a run that ended without "
                      "releasing it (%s)", self.path, _describe(previous))
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
    handle.flush()
    self.file = handle
    return self

  def release(self) -> None:
    if self.file is None:
      return
    self.file.seek(0)
    self.file.truncate()  # an empty lock file: released cleanly
    self.file.flush()
    fcntl.flock(self.file, fcntl.LOCK_UN)
    self.file.close()
    self.file = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def _describe(text: str) -> str:
  try:
    holder = json.loads(text)
    return (f"pid {holder['pid']} on host {holder['host']}, started "
            f"{holder.get('started', '?')}")
  except (ValueError, KeyError, TypeError):
    return "holder unknown"
