"""Training metrics: device values → floats → metrics.jsonl and TensorBoard (process 0)."""

import json
import logging
from typing import Any

from etils import epath
import jax
import numpy as np


def _is_remote(path: epath.Path) -> bool:
  return "://" in str(path)


class MetricsWriter:
  """Scalars to `<workdir>/metrics.jsonl` and TensorBoard events under
  `<workdir>/tensorboard`, local or gs://. Only process 0 writes; the others are no-ops.

  Object stores cannot append: a remote metrics.jsonl is rewritten whole at each write
  (it holds one short line per logged step).

  `purge_step`: a resumed run passes the first step it will run. A killed run may have
  logged steps past its last checkpoint, which the resumed run logs again; the new
  events file then starts with a SessionLog START at `purge_step`, and TensorBoard drops
  the older events at steps >= it (its "orphaned data" purge), so each step shows once.
  """

  def __init__(self, workdir: str, purge_step: int | None = None):
    self.enabled = jax.process_index() == 0
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self.lines: list[str] = []
    self.file = None
    self.tensorboard = None
    if not self.enabled:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if _is_remote(self.path):
      self.lines = self.path.read_text().splitlines(True) if self.path.exists() else []
    else:
      self.file = self.path.open("a")
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      # tensorboardX writes gs:// itself (google-cloud-storage).
      self.tensorboard = SummaryWriter(str(epath.Path(workdir) / "tensorboard"),
                                       purge_step=purge_step)
    except ImportError:
      logging.warning("tensorboardX is not installed: metrics go to metrics.jsonl only")

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    line = json.dumps({"step": step, **scalars}) + "\n"
    if self.file is not None:
      self.file.write(line)
      self.file.flush()
    else:
      self.lines.append(line)
      self.path.write_text("".join(self.lines))
    if self.tensorboard is not None:
      for name, value in scalars.items():
        self.tensorboard.add_scalar(name, value, step)

  def close(self) -> None:
    if self.file is not None:
      self.file.close()
      self.file = None
    if self.tensorboard is not None:
      self.tensorboard.close()
      self.tensorboard = None


def write_tensorboard(workdir: str, step: int, scalars: dict[str, float]) -> None:
  """Adds `scalars` at `step` to the run's TensorBoard events (process 0), e.g. held-out
  accuracy after training, beside the training curves."""
  if jax.process_index() != 0:
    return
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  writer = SummaryWriter(str(epath.Path(workdir) / "tensorboard"))
  for name, value in scalars.items():
    if value is not None:
      writer.add_scalar(name, float(value), step)
  writer.close()


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
  """Device metrics → flat floats (routing fractions as routing/layer_L/expert_E)."""
  out = {}
  for name, value in metrics.items():
    value = np.asarray(value)
    if name == "routing_fraction":
      for layer, row in enumerate(value):
        for expert, fraction in enumerate(row):
          out[f"routing/layer_{layer}/expert_{expert}"] = float(fraction)
    else:
      out[name] = float(value)
  return out
