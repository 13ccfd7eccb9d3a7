"""Two local processes × 2 fake CPU devices, on a LLaVA JSON with image files: a SIGTERM
to one of them stops both at a common step with a checkpoint; until then they train
like one process × 4 devices; each opened only its shard of the records; and the
checkpoint resumes in one process on another mesh with the uninterrupted run's losses.

One launch serves every test here (module fixtures). The reference and the resumed run
share a mesh (fsdp=2 × tensor=2, not the pod's fsdp=4), so with the session's
compilation cache (tests/conftest.py) the cost is two compilations of the train step:
the two processes' (in parallel) and the reference's.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from leo_mini_jax.training import checkpoint as checkpoint_lib
from leo_mini_jax.training import loop
from tests.parallel import common

# Long enough that the notice lands mid-run on a loaded machine; the run stops early.
STEPS = 400
SIGNAL_AFTER = 3  # SIGTERM once metrics.jsonl has this many steps
BATCH = 8  # small_config's global batch: 4 rows per process
ONE_PROCESS_MESH = dict(fsdp=2, tensor=2)


def _one_process_config(train_json):
  config = common.pod_config(STEPS, train_json)
  config.mesh.update(ONE_PROCESS_MESH)
  return config


def _losses(workdir):
  """{step: loss}; a resumed run's rows replace the earlier ones of the same step."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {row["step"]: row["loss"] for row in map(json.loads, f)}


@pytest.fixture(scope="module")
def train_json(tmp_path_factory):
  return common.write_llava(str(tmp_path_factory.mktemp("llava")))


@pytest.fixture(scope="module")
def pod(tmp_path_factory, train_json):
  """The 2-process run: SIGTERM to process 1 only, after step SIGNAL_AFTER is logged."""
  pod = common.Pod(str(tmp_path_factory.mktemp("pod")), STEPS, train_json)
  try:
    pod.wait_for_step(SIGNAL_AFTER, timeout=900)
    pod.terminate(1)
  finally:  # on any failure above, finish() kills the workers
    pod.outputs = pod.finish(timeout=300)
  steps = {line.rsplit(" ", 1)[-1] for out in pod.outputs for line in out.splitlines()
           if "preempted; saved step" in line}
  assert len(steps) == 1, pod.outputs  # one common step, printed by both
  pod.step = int(steps.pop())
  return pod


@pytest.fixture(scope="module")
def straight(tmp_path_factory, train_json, pod):
  """The reference: one process, 4 devices, uninterrupted to the pod's step + 2."""
  assert jax.device_count() == 4, "tests/conftest.py sets 4 fake devices"
  workdir = str(tmp_path_factory.mktemp("straight"))
  with common.spy_reads() as reads:
    summary = loop.train(_one_process_config(train_json), workdir, progress=False,
                         stop_at=pod.step + 2)
  return dict(summary, reads=reads, losses=_losses(workdir))


def test_sigterm_to_one_process_saves_a_common_step_on_both(pod):
  # JAX's preemption sync manager spread process 1's notice to process 0, and both
  # joined the save at the same step after the one they had reached.
  for i, out in enumerate(pod.outputs):
    assert f"process {i}: preempted; saved step {pod.step}" in out, out[-3000:]
  assert SIGNAL_AFTER < pod.step < STEPS
  checkpointer = checkpoint_lib.Checkpointer(pod.workdir, common.pod_config(
      STEPS, "").checkpoint)
  assert checkpointer.all_steps() == [pod.step]
  position = checkpointer.data_position(pod.step)
  checkpointer.close()
  assert position["process_count"] == 2
  assert position["examples_seen"] == pod.step * BATCH
  assert sorted(_losses(pod.workdir)) == list(range(1, pod.step + 1))


def test_two_processes_train_like_one_process(pod, straight):
  got, want = _losses(pod.workdir), straight["losses"]
  steps = range(1, pod.step + 1)
  np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=1e-5)


def test_each_process_opened_only_its_shard_of_the_llava_json(pod, straight):
  reads = [pod.reads(0), pod.reads(1)]
  every = set(straight["reads"]["validated"])
  assert len(every) == common.NUM_RECORDS
  # Start-up checks: records p, p+2, ... of the JSON, each image opened once.
  checked = [set(r["validated"]) for r in reads]
  assert [len(r["validated"]) for r in reads] == [19, 18]
  assert [r["num_checked"] for r in reads] == [19, 18]
  assert [len(c) for c in checked] == [19, 18]
  assert not checked[0] & checked[1]
  assert checked[0] | checked[1] == every
  # Training: process p opened positions p, p+2, ... of the global stream, which one
  # process reads in order; nothing else. The loop assembles the next batch while a
  # step runs, so a preempted process may have read the batch of the step it did not
  # take.
  stream = straight["reads"]["trained"]
  assert len(stream) == (pod.step + 2) * BATCH
  for p, r in enumerate(reads):
    steps_read = len(r["trained"]) // (BATCH // 2)
    assert steps_read in (pod.step, pod.step + 1), f"process {p}"
    assert r["trained"] == stream[p:steps_read * BATCH:2], f"process {p}"
    assert r["num_read"] == len(r["trained"])


def test_preempted_checkpoint_resumes_in_one_process_on_another_mesh(
    tmp_path, train_json, pod, straight):
  # The 2-process fsdp=4 checkpoint continues here on fsdp=2 × tensor=2: the same data
  # from the same position, the losses and parameters of the uninterrupted run.
  workdir = str(tmp_path / "resume")
  shutil.copytree(pod.workdir, workdir)
  with common.spy_reads() as reads:
    resumed = loop.train(_one_process_config(train_json), workdir, progress=False,
                         stop_at=pod.step + 2)
  assert int(resumed["state"].step) == pod.step + 2
  assert [row["step"] for row in resumed["history"]] == [pod.step + 1, pod.step + 2]
  want = straight["losses"]
  np.testing.assert_allclose([h["loss"] for h in resumed["history"]],
                             [want[pod.step + 1], want[pod.step + 2]], rtol=1e-5)
  assert reads["trained"] == straight["reads"]["trained"][pod.step * BATCH:]
  for a, b in zip(jax.tree.leaves(jax.device_get(resumed["state"].params)),
                  jax.tree.leaves(jax.device_get(straight["state"].params))):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
