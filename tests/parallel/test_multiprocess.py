"""Two local processes × 2 fake CPU devices train like one process × 4 devices, and a
checkpoint they write resumes in one process with the same losses.

Slow: three compilations of the train step (two in parallel processes) take 2–10 minutes
on a shared 2-core machine.
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


def _losses(workdir):
  """{step: loss}; a resumed run's rows replace the earlier ones of the same step."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {row["step"]: row["loss"] for row in map(json.loads, f)}


@pytest.mark.slow
def test_two_processes_match_one_process_and_resume_in_one(tmp_path):
  assert jax.device_count() == 4, "tests/conftest.py sets 4 fake devices"
  # Reference: one process, 4 devices, 4 uninterrupted steps.
  config = common.pod_config(steps=4)
  straight = loop.train(config, str(tmp_path / "straight"), progress=False)
  want = _losses(str(tmp_path / "straight"))

  # The same run in 2 processes × 2 devices, checkpointing at steps 2 and 4.
  pod_dir = str(tmp_path / "pod")
  outputs = common.launch(pod_dir, steps=4, timeout=1200, every_steps=2)
  assert all("stopped at step 4" in out for out in outputs), outputs
  got = _losses(pod_dir)
  assert sorted(got) == [1, 2, 3, 4]
  np.testing.assert_allclose([got[s] for s in range(1, 5)], [want[s] for s in range(1, 5)],
                             rtol=1e-5)
  setup = straight["setup"]
  checkpointer = checkpoint_lib.Checkpointer(pod_dir, config.checkpoint)
  pod_state = checkpointer.restore(4, setup.abstract_state)
  assert checkpointer.data_position(4)["process_count"] == 2
  checkpointer.close()
  for a, b in zip(jax.tree.leaves(jax.device_get(pod_state.params)),
                  jax.tree.leaves(jax.device_get(straight["state"].params))):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)

  # Resume the 2-process checkpoint of step 2 in this one process (another mesh too:
  # fsdp=2 × tensor=2): steps 3 and 4 see the same data and give the same losses.
  resume_dir = str(tmp_path / "resume")
  shutil.copytree(pod_dir, resume_dir)
  shutil.rmtree(os.path.join(resume_dir, "checkpoints", "4"))
  config = common.pod_config(steps=4)
  config.mesh.update(fsdp=2, tensor=2)
  resumed = loop.train(config, resume_dir, progress=False)
  assert int(resumed["state"].step) == 4
  assert [row["step"] for row in resumed["history"]] == [3, 4]
  np.testing.assert_allclose([h["loss"] for h in resumed["history"]], [want[3], want[4]],
                             rtol=1e-5)
