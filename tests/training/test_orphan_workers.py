"""A SIGKILLed run leaves no grain worker (or resource tracker) behind."""

import pytest
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow  # > 20 s on the 2-core CI machine
def test_grain_workers_exit_when_the_process_that_started_them_is_killed():
  # The train loop's data path: make_dataset with worker processes, iterated.
  code = textwrap.dedent("""
      import time
      from tests.training.conftest import small_config
      from leo_mini_jax.data import pipeline
      config = small_config(1, **{"data.num_workers": 2})
      iterator = pipeline.make_dataset(config.data, split="train").iterator()
      next(iterator)
      print("reading", flush=True)
      time.sleep(600)
  """)
  descendants = []
  proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                          text=True)
  try:
    assert proc.stdout.readline().strip() == "reading"
    descendants = psutil.Process(proc.pid).children(recursive=True)
    assert len(descendants) >= 2  # the workers (and multiprocessing's helpers)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    alive = descendants
    while alive and time.monotonic() < deadline:
      time.sleep(0.5)
      alive = [p for p in descendants
               if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left running after the parent's SIGKILL: {alive}"
  finally:
    proc.kill()
    for p in descendants:  # what this test started, if the check above failed
      try:
        p.kill()
      except psutil.NoSuchProcess:
        pass
