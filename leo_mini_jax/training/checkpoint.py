"""Checkpoints with orbax: the train state and the data position side by side.

Layout of a run's workdir (local or gs://, through etils.epath):

    <workdir>/checkpoints/<step>/state          TrainState as {'step', 'params', 'opt_state'}
    <workdir>/checkpoints/<step>/data_position  JSON: examples (with data.packing:
                                                packed rows) of the global shuffled
                                                stream consumed (data_position.py)

A parameters-only checkpoint (what `porting.convert` writes, and what `init_from` also
accepts) is an orbax PyTree checkpoint directory holding {'params': ...}.

Restores always go into abstract targets that carry the *current* shardings, so a run can
resume on a different mesh and process count. The data position is a count of global
examples, not a per-process iterator state, for the same reason: the pipeline restarts
at that position for whatever processes and batch size the resumed run has
(`pipeline.make_dataset(start_position=...)`).
"""

import logging
import re
import time
from typing import Any, Callable

from etils import epath
from flax import traverse_util
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from leo_mini_jax.training import recovery as recovery_lib

STATE, DATA_POSITION = "state", "data_position"
# load_params names at most this many keys per kind of mismatch (a wrong model has hundreds).
MAX_NAMED = 40


class CheckpointMismatchError(ValueError):
  """The checkpoint is intact but holds another model's parameters."""


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


def _path(path: str) -> epath.Path:
  path = epath.Path(path)
  return path if str(path).startswith(("gs://", "s3://")) else path.absolute()


def save_params(path: str, params: Any) -> None:
  """Writes a parameters-only checkpoint ({'params': params}) at `path`."""
  checkpointer = ocp.PyTreeCheckpointer()
  checkpointer.save(_path(path), args=ocp.args.PyTreeSave({"params": params}), force=True)


def _params_candidates(path: str) -> list[tuple[epath.Path, epath.Path | None]]:
  """(orbax item directory holding {'params': ...}, its step directory or None), newest
  first: every finished step of a train workdir, else the one step or params dir."""
  path = _path(path)
  manager_dir = path / "checkpoints"
  if manager_dir.is_dir():
    steps = sorted((int(d.name) for d in manager_dir.iterdir() if d.name.isdigit()),
                   reverse=True)
    if not steps:
      raise FileNotFoundError(f"init_from: no checkpoint under {manager_dir}")
    return [(manager_dir / str(s) / STATE, manager_dir / str(s)) for s in steps]
  if (path / STATE).is_dir():
    return [(path / STATE, path)]
  if path.is_dir():
    return [(path, None)]
  raise FileNotFoundError(f"init_from: {path} does not exist")


def step_record(step_dir: epath.Path | None) -> dict:
  """The JSON saved beside a step's state (data position, checksums, stage); {} if none."""
  if step_dir is None or not (step_dir / DATA_POSITION).exists():
    return {}
  restored = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
      step_dir / DATA_POSITION)
  return dict(restored)


def _flat(tree: Any) -> dict[str, Any]:
  return traverse_util.flatten_dict(dict(tree), sep="/")


def load_params(path: str, abstract_params: Any,
                init_fresh: Callable[[list[str]], dict[str, Any]] | None = None,
                allow_missing: str = r"$^", source: dict | None = None
                ) -> tuple[Any, list[str]]:
  """Initialises a run from another run's (or a port's) parameters.

  Checkpointed parameters are read straight into `abstract_params`' shardings (and
  dtypes: a float32 checkpoint fills bfloat16 frozen weights); no full random copy of the
  model is made first. Only what is allowed to be missing comes from `init_fresh`.

  Args:
    path: a train workdir (its latest step), a step directory, or a params checkpoint.
    abstract_params: ShapeDtypeStructs with the target shardings (plain tree).
    init_fresh: paths → {path: initialised array} for the parameters the checkpoint
      lacks (needed only when something is).
    allow_missing: regex (full match) of parameter paths that may be absent and stay fresh.
    source: filled with what was read: {'path', 'step' (None for a params checkpoint),
      'record' (the step's saved data-position record)}.

  A train workdir's checkpoints are verified as on resume (orbax's checks, finite values,
  the checksums saved at each save); a broken step is named and the previous one read.

  Returns:
    (params, the paths initialised fresh).

  Raises:
    CheckpointMismatchError naming every missing (not allowed), unexpected and
    shape-mismatched path; recovery.BrokenCheckpointError when no step is complete.
  """
  candidates = _params_candidates(path)
  rejected = []
  for item_dir, step_dir in candidates:
    try:
      params, fresh = _load_params_from(path, item_dir, abstract_params, init_fresh,
                                        allow_missing, step_record(step_dir))
    except CheckpointMismatchError:
      raise  # the wrong model, not damage: an earlier step would not fit either
    except Exception as e:  # pylint: disable=broad-except
      logging.error("checkpoint %s is broken (%s); trying the previous one",
                    item_dir, recovery_lib.short_error(e))
      rejected.append((item_dir, e))
      continue
    if rejected:
      logging.warning("%s: loaded %s, the latest complete checkpoint", path, item_dir)
    if source is not None:
      source.update(path=str(item_dir), step=(None if step_dir is None or not
                                             step_dir.name.isdigit() else int(step_dir.name)),
                    record=step_record(step_dir))
    return params, fresh
  details = "; ".join(f"{d}: {recovery_lib.short_error(e)}" for d, e in rejected)
  raise recovery_lib.BrokenCheckpointError(f"{path}: no complete checkpoint ({details})")


def _load_params_from(path, item_dir, abstract_params, init_fresh, allow_missing,
                      record: dict) -> tuple[Any, list[str]]:
  """load_params from one item directory, verified like a resume (finite values, the
  checksums saved beside a train step)."""
  metadata = ocp.PyTreeCheckpointer().metadata(item_dir)
  tree = getattr(metadata, "item_metadata", metadata)
  tree = getattr(tree, "tree", tree)
  if "params" not in tree:
    raise CheckpointMismatchError(
        f"init_from: {item_dir} holds no 'params' (keys: {sorted(tree)})")
  saved = _flat(tree["params"])
  wanted = _flat(abstract_params)
  allowed = re.compile(allow_missing)
  missing = sorted(p for p in wanted if p not in saved and not allowed.fullmatch(p))
  unexpected = sorted(p for p in saved if p not in wanted)
  mismatched = sorted(f"{p}: checkpoint {tuple(saved[p].shape)} vs model "
                      f"{tuple(wanted[p].shape)}"
                      for p in wanted if p in saved
                      and tuple(saved[p].shape) != tuple(wanted[p].shape))
  if missing or unexpected or mismatched:
    lines = [f"init_from {path}: the checkpoint does not fit the model"]
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("shape mismatch", mismatched)):
      if items:
        lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:MAX_NAMED])
                     + (f", ... and {len(items) - MAX_NAMED} more"
                        if len(items) > MAX_NAMED else ""))
    raise CheckpointMismatchError("\n".join(lines))
  fresh_paths = sorted(p for p in wanted if p not in saved)
  subset = traverse_util.unflatten_dict(
      {p: x for p, x in wanted.items() if p in saved}, sep="/")
  restored = ocp.PyTreeCheckpointer().restore(
      item_dir, args=ocp.args.PyTreeRestore(
          item={"params": subset},
          restore_args=ocp.checkpoint_utils.construct_restore_args({"params": subset}),
          partial_restore=True))["params"]
  merged = {}
  if fresh_paths:
    if init_fresh is None:
      raise CheckpointMismatchError(f"init_from {path}: {len(fresh_paths)} parameters are new "
                       f"({', '.join(fresh_paths[:5])}, ...) and no initialiser was given")
    merged.update(init_fresh(fresh_paths))
    logging.info("init_from %s: %d new parameters initialised", path, len(fresh_paths))
  _verify_params(restored, record)
  merged.update(_flat(restored))
  return traverse_util.unflatten_dict(merged, sep="/"), fresh_paths


def _verify_params(restored: Any, record: dict) -> None:
  from leo_mini_jax.training import guards  # pylint: disable=g-import-not-at-top
  if not guards.tree_is_finite(restored):
    raise ValueError("it holds non-finite parameters (never saved by the loop)")
  saved = record.get(recovery_lib.CHECKSUMS)
  if saved:
    got = recovery_lib.tree_checksums({"params": restored})
    bad = sorted(k for k in got if k in saved and got[k] != saved[k])
    if bad:
      raise ValueError(f"checksum mismatch in {len(bad)} arrays: {', '.join(bad[:3])}")
