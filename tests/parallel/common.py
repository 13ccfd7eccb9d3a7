"""The config, data, launcher and read spy shared by the multi-process tests."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import portpicker

from configs import tiny
from leo_mini_jax.data import images as images_lib
from leo_mini_jax.data import llava as llava_lib
from leo_mini_jax.data import synthetic
from tests.training.conftest import small_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# An odd count, so the two processes' validation shards differ in size (19 and 18).
NUM_RECORDS = 37


def write_llava(folder: str, num: int = NUM_RECORDS) -> str:
  """A LLaVA JSON of `num` records with one PNG each (the tiny config's questions)."""
  return synthetic.export(folder, "train", num, 64, seed=3,
                          question_types=tiny.QUESTION_TYPES)


def pod_config(steps: int, train_json: str, every_steps: int = 0):
  """Stage 2 (everything trains) on a LLaVA JSON, FSDP over every device, checkpoints
  every_steps (0: at the end and on preemption only)."""
  config = small_config(2, total_steps=steps)  # CLIP only (see small_config)
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  config.data.kind = "llava"
  config.data.train_json = train_json
  # Batches are read when the step asks for them (no read-ahead), so the records a
  # process opened are exactly those it trained on.
  config.data.prefetch_batches = 0
  config.checkpoint.every_steps = every_steps
  config.checkpoint.async_save = False
  # See tests/training/test_sharded_step.py: with eps=1e-8, Adam's first steps turn
  # summation-order noise in near-zero gradients into lr-sized parameter differences.
  config.optimizer.eps = 1e-3
  return config


@contextlib.contextmanager
def spy_reads():
  """Records the image files this process opens: {'validated': [names] (start-up
  checks, any order), 'trained': [names] (train rows, in read order), 'num_checked',
  'num_read' (the library's own counters of the last LLaVA source loaded)}."""
  reads = {"validated": [], "trained": [], "num_checked": None, "num_read": None}
  loaded = []
  originals = (images_lib.image_problem, images_lib.to_master_resolution,
               llava_lib.load_llava)

  def image_problem(source, *args, **kwargs):
    reads["validated"].append(os.path.basename(os.fspath(source)))
    return originals[0](source, *args, **kwargs)

  def to_master_resolution(source, *args, **kwargs):
    reads["trained"].append(os.path.basename(os.fspath(source)))
    return originals[1](source, *args, **kwargs)

  def load_llava(*args, **kwargs):
    loaded.append(originals[2](*args, **kwargs))
    return loaded[-1]

  images_lib.image_problem = image_problem
  images_lib.to_master_resolution = to_master_resolution
  llava_lib.load_llava = load_llava
  try:
    yield reads
  finally:
    (images_lib.image_problem, images_lib.to_master_resolution,
     llava_lib.load_llava) = originals
    if loaded:
      source, report = loaded[-1]
      reads["num_read"] = source.num_read
      reads["num_checked"] = None if report is None else report.num_checked


class Pod:
  """`num_processes` local processes of `tests.parallel.worker`, outputs in log files.

  Logs go to files, not pipes: a worker that fills a pipe nobody reads would block.
  A hung worker (a collective waiting for a dead peer) is stopped with SIGKILL: after
  jax.distributed.initialize JAX owns SIGTERM.
  """

  def __init__(self, workdir: str, steps: int, train_json: str, num_processes: int = 2,
               local_devices: int = 2, **flags):
    self.workdir = workdir
    os.makedirs(workdir, exist_ok=True)
    port = portpicker.pick_unused_port()
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    self.procs, self.logs = [], []
    for i in range(num_processes):
      cmd = [sys.executable, "-m", "tests.parallel.worker", f"--port={port}",
             f"--process_id={i}", f"--num_processes={num_processes}",
             f"--local_devices={local_devices}", f"--workdir={workdir}",
             f"--steps={steps}", f"--train_json={train_json}"]
      cmd += [f"--{k}={v}" for k, v in flags.items()]
      self.logs.append(os.path.join(workdir, f"worker-{i}.log"))
      with open(self.logs[-1], "w") as log:
        self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log,
                                           stderr=subprocess.STDOUT))

  def output(self, i: int) -> str:
    with open(self.logs[i]) as f:
      return f.read()

  def logged_steps(self) -> int:
    """Rows in metrics.jsonl (process 0 writes one per step)."""
    try:
      with open(os.path.join(self.workdir, "metrics.jsonl")) as f:
        return sum(1 for line in f if line.endswith("\n"))
    except FileNotFoundError:
      return 0

  def wait_for_step(self, step: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while self.logged_steps() < step:
      failed = [i for i, p in enumerate(self.procs) if p.poll() is not None]
      assert not failed, f"process {failed[0]} ended early:\n{self.output(failed[0])[-4000:]}"
      assert time.monotonic() < deadline, f"step {step} not logged in {timeout} s"
      time.sleep(0.2)

  def terminate(self, i: int) -> None:
    """SIGTERM to process i, as a scheduler's preemption notice."""
    self.procs[i].send_signal(signal.SIGTERM)

  def finish(self, timeout: float) -> list[str]:
    """Waits for every process (SIGKILL after `timeout` s); their outputs. Each must
    exit with status 0."""
    deadline = time.monotonic() + timeout
    try:
      for proc in self.procs:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      pass
    finally:
      for proc in self.procs:
        if proc.poll() is None:
          proc.kill()
          proc.wait()
    outputs = [self.output(i) for i in range(len(self.procs))]
    for i, (proc, out) in enumerate(zip(self.procs, outputs)):
      assert proc.returncode == 0, f"process {i} exited {proc.returncode}:\n{out[-4000:]}"
    return outputs

  def reads(self, i: int) -> dict:
    with open(os.path.join(self.workdir, f"reads-{i}.json")) as f:
      return json.load(f)
