"""SIGKILL at random moments (inside steps, between them, while an async save is in
flight), then the same command again: the run ends with exactly the losses and the
parameters of an uninterrupted run, and metrics.jsonl holds one row per step."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import tiny
from leo_mini_jax.training import checkpoint as checkpoint_lib
from leo_mini_jax.training import loop
from leo_mini_jax.training import recovery

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 10
# Saves at every step (async), so a kill often lands in one; keep=2 also has orbax
# deleting old steps while the run goes on.
OVERRIDES = {
    "data.batch_size": 8, "data.num_train": 64, "data.num_eval": 16,
    "data.read_threads": 1, "optimizer.warmup_steps": 1, "log_every": 1,
    "checkpoint.every_steps": 1, "checkpoint.keep": 2,
}


def _config():
  config = tiny.get_config(f"stage=3,steps={STEPS},experts=clip")
  for key, value in OVERRIDES.items():
    section, _, field = key.rpartition(".")
    (config[section] if section else config)[field] = value
  return config


def _start(workdir, cache, log):
  flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  command = [sys.executable, "train.py",
             f"--config=configs/tiny.py:stage=3,steps={STEPS},experts=clip",
             f"--workdir={workdir}", f"--config.compilation_cache_dir={cache}"] + flags
  # One CPU device (not the 4 fake ones of the test process): the same mesh every time.
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=log)


def _rows(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  return open(path).read().count("\n") if os.path.exists(path) else 0


def _save_in_flight(workdir):
  directory = os.path.join(workdir, "checkpoints")
  return os.path.isdir(directory) and any("tmp" in d for d in os.listdir(directory))


def _after_rows(workdir, rows, delay):
  """True from `delay` seconds after metrics.jsonl first holds `rows` rows."""
  reached = []

  def ready():
    if not reached and _rows(workdir) >= rows:
      reached.append(time.monotonic())
    return bool(reached) and time.monotonic() - reached[0] >= delay
  return ready


def _kill_when(process, ready, deadline_s=300):
  """SIGKILLs `process` once ready() holds; False if it ended first."""
  deadline = time.monotonic() + deadline_s
  while process.poll() is None and time.monotonic() < deadline:
    if ready():
      process.send_signal(signal.SIGKILL)
      process.wait()
      return True
    time.sleep(0.002)
  return False


def test_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run(tmp_path):
  rng = np.random.default_rng(10)
  cache = str(tmp_path / "xla_cache")
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  log = open(tmp_path / "train.log", "w")
  reference = _start(straight, cache, log)  # runs beside the killed one

  kills = []
  for kind in ("save", "step", "save", "step", "startup"):
    before = _rows(killed)
    start = time.monotonic()
    process = _start(killed, cache, log)
    if kind == "save":  # the moment an async save's temporary directory appears
      ready = lambda: _rows(killed) > before and _save_in_flight(killed)
    elif kind == "step":  # a random moment some steps after the restart
      ready = _after_rows(killed, before + int(rng.integers(1, 3)),
                          float(rng.uniform(0.0, 0.4)))
    else:  # while starting: restoring, reading data or compiling
      delay = float(rng.uniform(1.0, 4.0))
      ready = lambda delay=delay: time.monotonic() - start >= delay
    in_flight = None
    if _kill_when(process, ready):
      in_flight = _save_in_flight(killed)
      kills.append((kind, _rows(killed), in_flight))
    if process.returncode == 0:
      break
  assert any(kind == "save" and in_flight for kind, _, in_flight in kills), kills
  assert len(kills) >= 3, kills

  final = _start(killed, cache, log)  # the same command, left to finish
  assert final.wait(timeout=600) == 0, open(tmp_path / "train.log").read()[-3000:]
  assert reference.wait(timeout=600) == 0, open(tmp_path / "train.log").read()[-3000:]
  log.close()

  # One row per step after all the restarts (rows past the restored step are dropped).
  lines = open(os.path.join(killed, "metrics.jsonl")).read().splitlines()
  assert len(lines) == STEPS, (kills, lines)
  got, want = recovery.read_metrics(killed), recovery.read_metrics(straight)
  assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
  for step in want:
    assert got[step]["loss"] == want[step]["loss"], (step, kills)
    assert got[step]["grad_norm"] == want[step]["grad_norm"], (step, kills)

  config = _config()
  setup = loop.TrainSetup(config, loop.mesh_lib.make_mesh(dict(data=1),
                                                          devices=jax.devices()[:1]))
  finals = []
  for workdir in (killed, straight):
    checkpointer = checkpoint_lib.Checkpointer(workdir, config.checkpoint)
    assert checkpointer.latest_step() == STEPS
    finals.append(jax.device_get(checkpointer.restore(STEPS, setup.abstract_state)))
    checkpointer.close()
  for a, b in zip(jax.tree.leaves(finals[0]), jax.tree.leaves(finals[1]), strict=True):
    np.testing.assert_array_equal(a, b)
