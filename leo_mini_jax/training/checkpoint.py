"""Checkpoints with orbax: the train state and the data position side by side.

Layout of a run's workdir (local or gs://, through etils.epath):

    <workdir>/checkpoints/<step>/state          TrainState as {'step', 'params', 'opt_state'}
    <workdir>/checkpoints/<step>/data_position  JSON: examples of the global shuffled
                                                stream consumed (see below)

Reading parameters alone (from a train workdir, a step or a parameters-only
checkpoint), for `init_from`, evaluation and porting, is `leo_mini_jax/checkpoints.py`.

Restores always go into abstract targets that carry the *current* shardings, so a run can
resume on a different mesh and process count. The data position is a count of global
examples, not a per-process iterator state, for the same reason: the pipeline restarts
at that position for whatever processes and batch size the resumed run has
(`pipeline.make_dataset(start_position=...)`).
"""

import time
from typing import Any, Callable

from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from leo_mini_jax.checkpoints import DATA_POSITION, STATE


class Checkpointer:
  """Keep-N + keep-period, async saves, the data position beside the train state."""

  def __init__(self, workdir: str, cfg: Any):
    self.directory = epath.Path(workdir) / "checkpoints"
    if not str(self.directory).startswith(("gs://", "s3://")):
      self.directory = self.directory.absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep, keep_period=cfg.get("keep_period") or None,
        enable_async_checkpointing=bool(cfg.get("async_save", True)), create=True,
        # A save cut off by a kill leaves `<step>.orbax-checkpoint-tmp*`; if that step is
        # never saved again nothing else removes it (a full state's size).
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE: ocp.StandardCheckpointHandler(),
                       DATA_POSITION: ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, data_position: dict | None = None) -> None:
    """Starts an (async) save; every process calls it at the same step."""
    items = {STATE: ocp.args.StandardSave(_state_dict(state))}
    if data_position is not None:
      items[DATA_POSITION] = ocp.args.JsonSave(dict(data_position))
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state: Any) -> Any:
    """The train state of `step`, restored into `abstract_state` (ShapeDtypeStructs that
    carry the target shardings): any mesh, any process count."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        **{STATE: ocp.args.StandardRestore(_state_dict(abstract_state))}))
    return type(abstract_state)(**restored[STATE])

  def data_position(self, step: int) -> dict | None:
    """The saved data position of `step` ({'examples_seen', ...}), None if absent."""
    if not (self.directory / str(step) / DATA_POSITION).exists():
      return None
    restored = self.manager.restore(step, args=ocp.args.Composite(
        **{DATA_POSITION: ocp.args.JsonRestore()}))
    return dict(restored[DATA_POSITION])

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def _state_dict(state: Any) -> dict:
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


class SavePolicy:
  """The one place that decides whether to save after a step.

  Reasons: 'final' (the last step), 'preempted' (a preemption notice reached this step),
  'steps' (every `every_steps`), 'seconds' (`every_seconds` since the last save, on
  process 0's clock, so that all processes agree).
  """

  def __init__(self, cfg: Any, now: Callable[[], float] = time.monotonic):
    self.every_steps = int(cfg.get("every_steps") or 0)
    self.every_seconds = float(cfg.get("every_seconds") or 0)
    self.now = now
    self.last_save = now()

  def saved(self) -> None:
    self.last_save = self.now()

  def reason(self, step: int, total: int, preempted: bool) -> str | None:
    if step == total:
      return "final"
    if preempted:
      return "preempted"
    if self.every_steps and step % self.every_steps == 0:
      return "steps"
    if self.every_seconds and self._time_is_up():
      return "seconds"
    return None

  def _time_is_up(self) -> bool:
    due = self.now() - self.last_save >= self.every_seconds
    if jax.process_count() > 1:
      due = bool(multihost_utils.broadcast_one_to_all(np.int32(due)))
    return due
