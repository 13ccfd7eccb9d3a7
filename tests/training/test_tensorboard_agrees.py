"""TensorBoard shows exactly the steps of metrics.jsonl, after kills and restarts."""

import collections
import json
import os

from leo_mini_jax.training import metrics as metrics_lib
from leo_mini_jax.training import recovery
from tests.training import test_resume


def scalar_events(workdir):
  """{(tag, step): [values]} over every events file."""
  found = collections.defaultdict(list)
  for _, step, tag, value in test_resume._scalar_events(workdir):
    found[(tag, step)].append(value)
  return found


def _rows(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def test_each_row_reaches_tensorboard_before_the_next_step(tmp_path):
  writer = metrics_lib.MetricsWriter(str(tmp_path))
  writer.write(1, {"loss": 2.5})
  # No close: a SIGKILL now must not lose the row in TensorBoard.
  assert scalar_events(str(tmp_path)) == {("loss", 1): [2.5]}
  writer.close()


def test_restarts_leave_tensorboard_equal_to_metrics_jsonl(tmp_path):
  workdir = str(tmp_path)
  # A run logged steps 1-4 and died before its first checkpoint, with steps 3-4 lost
  # from TensorBoard's buffer (written to metrics.jsonl only).
  writer = metrics_lib.MetricsWriter(workdir)
  for step in (1, 2):
    writer.write(step, {"loss": 10.0 + step})
  writer.close()
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    for step in (3, 4):
      f.write(json.dumps({"step": step, "loss": 10.0 + step}) + "\n")
  # Restart from step 2's checkpoint: steps 3, 4 run again with other values.
  recovery.truncate_metrics(workdir, 2)
  writer = metrics_lib.MetricsWriter(workdir)
  for step in (3, 4, 5):
    writer.write(step, {"loss": 20.0 + step})
  writer.close()
  # Restart from scratch (no checkpoint survived): steps 1.. run again.
  recovery.truncate_metrics(workdir, 0)
  writer = metrics_lib.MetricsWriter(workdir)
  writer.write(1, {"loss": 31.0})
  writer.close()
  assert scalar_events(workdir) == {("loss", 1): [31.0]}

  recovery.truncate_metrics(workdir, 1)
  writer = metrics_lib.MetricsWriter(workdir)
  writer.write(2, {"loss": 32.0})
  writer.close()
  want = {("loss", r["step"]): [r["loss"]] for r in _rows(workdir)}
  assert want == {("loss", 1): [31.0], ("loss", 2): [32.0]}
  assert scalar_events(workdir) == want
