"""Training metrics: device values → floats → metrics.jsonl and TensorBoard (process 0)."""

import json
import logging
import time
from typing import Any

from etils import epath
import jax
import numpy as np

from leo_mini_jax import run_events


def _is_remote(path: epath.Path) -> bool:
  return "://" in str(path)


class MetricsWriter:
  """Scalars to `<workdir>/metrics.jsonl` and TensorBoard events under
  `<workdir>/tensorboard`, local or gs://. Only process 0 writes; the others are no-ops.

  Object stores cannot append: a remote metrics.jsonl is rewritten whole at each write
  (it holds one short line per logged step).

  TensorBoard agrees with metrics.jsonl after any kill: each write is flushed to both,
  and at start the events are rebuilt from metrics.jsonl (which the resumed run has
  already cut to its restored step). Without the rebuild, a kill drops tensorboardX's
  unflushed events for good, and a run that restarts before its first checkpoint shows
  its first steps twice.
  """

  def __init__(self, workdir: str):
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
      from tensorboardX import event_file_writer  # pylint: disable=g-import-not-at-top
    except ImportError:
      logging.warning("tensorboardX is not installed: metrics go to metrics.jsonl only")
      return
    events = epath.Path(workdir) / run_events.TENSORBOARD
    if events.exists():  # the training events only: evaluations keep their own folder
      for old in events.glob("events.*"):
        old.unlink()
    events.mkdir(parents=True, exist_ok=True)
    # tensorboardX's synchronous writer (SummaryWriter queues events for a thread that
    # flushes every 2 minutes); it writes gs:// itself (google-cloud-storage).
    self.tensorboard = event_file_writer.EventsWriter(str(events / "events"))
    for row in _read_rows(self.path):
      self._add(int(row.pop("step")), row)
    self.tensorboard.flush()

  def _add(self, step: int, scalars: dict[str, float]) -> None:
    from tensorboardX.proto import event_pb2, summary_pb2  # pylint: disable=g-import-not-at-top
    values = [summary_pb2.Summary.Value(tag=name, simple_value=float(value))
              for name, value in scalars.items()]
    self.tensorboard.write_event(event_pb2.Event(
        wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=values)))

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
      self._add(step, scalars)
      self.tensorboard.flush()  # one small write per logged row; a kill loses none

  def close(self) -> None:
    if self.file is not None:
      self.file.close()
      self.file = None
    if self.tensorboard is not None:
      self.tensorboard.close()
      self.tensorboard = None


def _read_rows(path: epath.Path) -> list[dict]:
  """The parsed rows of metrics.jsonl (a cut last line skipped)."""
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except ValueError:
      continue
  return rows


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
