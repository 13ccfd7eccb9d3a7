"""One run per workdir; a killed run's lock is taken over; one metrics row per step."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from leo_mini_jax.training import loop
from leo_mini_jax.training import recovery
from leo_mini_jax.training import workdir_lock
from tests.training.conftest import small_config


def _holder(workdir):
  """A live process holding the workdir's lock (it prints 'held' once it does)."""
  code = textwrap.dedent(f"""
      import sys, time
      from leo_mini_jax.training import workdir_lock
      lock = workdir_lock.WorkdirLock({str(workdir)!r}).acquire()
      print("held", flush=True)
      time.sleep(600)
  """)
  proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_a_second_run_on_a_held_workdir_stops_at_start_naming_the_holder(tmp_path):
  holder = _holder(tmp_path)
  try:
    with pytest.raises(workdir_lock.WorkdirLockedError,
                       match=rf"in use by another training run \(pid {holder.pid} on "
                             rf"host {socket.gethostname()}"):
      loop.train(small_config(1), str(tmp_path), progress=False)
    assert not (tmp_path / "checkpoints").exists()
    assert not (tmp_path / "metrics.jsonl").exists()
  finally:
    holder.kill()
    holder.wait()


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path, caplog):
  holder = _holder(tmp_path)
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  lock = workdir_lock.WorkdirLock(str(tmp_path))
  with caplog.at_level("WARNING"):
    lock.acquire()
  try:
    assert f"pid {holder.pid}" in caplog.text and "stale" in caplog.text
    assert json.loads((tmp_path / workdir_lock.LOCK_NAME).read_text())["pid"] == os.getpid()
    with pytest.raises(workdir_lock.WorkdirLockedError):
      workdir_lock.WorkdirLock(str(tmp_path)).acquire()  # now held by this process
  finally:
    lock.release()
  workdir_lock.WorkdirLock(str(tmp_path)).acquire().release()  # released: free again


def test_resume_keeps_exactly_one_metrics_row_per_step(tmp_path):
  # Two runs that wrote into one file, then a kill mid-line.
  rows = [{"step": s, "loss": float(s + run)} for run in (0, 10) for s in (1, 2, 3)]
  text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo'
  (tmp_path / "metrics.jsonl").write_text(text)
  assert recovery.truncate_metrics(str(tmp_path), 2) == 5
  kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert kept == [{"step": 1, "loss": 11.0}, {"step": 2, "loss": 12.0}]
