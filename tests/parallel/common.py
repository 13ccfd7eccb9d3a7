"""The config and launcher shared by the multi-process tests."""

import os
import subprocess
import sys

import portpicker

from tests.training.conftest import small_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pod_config(steps: int, every_steps: int = 0):
  """Stage 2 (everything trains), FSDP over every device, checkpoints every_steps."""
  config = small_config(2, total_steps=steps)
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  config.checkpoint.every_steps = every_steps
  config.checkpoint.async_save = False
  # See tests/training/test_sharded_step.py: with eps=1e-8, Adam's first steps turn
  # summation-order noise in near-zero gradients into lr-sized parameter differences.
  config.optimizer.eps = 1e-3
  return config


def launch(workdir: str, steps: int, num_processes: int = 2, local_devices: int = 2,
           timeout: float = 420, **flags) -> list[str]:
  """Runs `tests.parallel.worker` in `num_processes` local processes; their outputs.

  A hung worker (a collective waiting for a dead peer) is stopped with SIGKILL: after
  jax.distributed.initialize JAX owns SIGTERM.
  """
  port = portpicker.pick_unused_port()
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  procs = []
  for i in range(num_processes):
    cmd = [sys.executable, "-m", "tests.parallel.worker", f"--port={port}",
           f"--process_id={i}", f"--num_processes={num_processes}",
           f"--local_devices={local_devices}", f"--workdir={workdir}", f"--steps={steps}"]
    cmd += [f"--{k}={v}" for k, v in flags.items()]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  outputs = []
  try:
    for proc in procs:
      out, _ = proc.communicate(timeout=timeout)
      outputs.append(out)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  for i, (proc, out) in enumerate(zip(procs, outputs)):
    assert proc.returncode == 0, f"process {i} failed:\n{out[-4000:]}"
  return outputs
