"""Reading a model's parameters from a checkpoint, outside training as within it.

`evaluation`, `ask`, `porting.convert` and a run's `init_from` read parameters here; the
trainer's own checkpoints (`training/checkpoint.py`: the train state, the data position,
resuming) are written in the layout this module reads:

    <workdir>/checkpoints/<step>/state          {'step', 'params', 'opt_state'}
    <workdir>/checkpoints/<step>/data_position  JSON record: data position, per-leaf
                                                checksums ('checksums'), stage

A parameters-only checkpoint (what `porting.convert` writes, and what `init_from` also
accepts) is an orbax PyTree checkpoint directory holding {'params': ...}.

Reads go straight into abstract targets that carry the *current* shardings and are
verified as a resume is (finite values, the checksums saved beside a train step).
"""

import logging
import re
from typing import Any, Callable

from etils import epath
from flax import traverse_util
import orbax.checkpoint as ocp

from leo_mini_jax import errors
from leo_mini_jax import tree_checks

# A train step's two items, and the record's key of the state's per-leaf checksums.
STATE, DATA_POSITION = "state", "data_position"
CHECKSUMS = "checksums"
# load_params names at most this many keys per kind of mismatch (a wrong model has hundreds).
MAX_NAMED = 40


class CheckpointMismatchError(ValueError):
  """The checkpoint is intact but holds another model's parameters."""


class BrokenCheckpointError(errors.UserError, RuntimeError):
  """No checkpoint in the directory can be restored."""


def short_error(error: Exception) -> str:
  """An exception in one log line (type, message cut at 300 characters)."""
  text = f"{type(error).__name__}: {error}".replace("\n", " ")
  return text if len(text) <= 300 else text[:300] + " ..."


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
    shape-mismatched path; BrokenCheckpointError when no step is complete.
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
                    item_dir, short_error(e))
      rejected.append((item_dir, e))
      continue
    if rejected:
      logging.warning("%s: loaded %s, the latest complete checkpoint", path, item_dir)
    if source is not None:
      source.update(path=str(item_dir), step=(None if step_dir is None or not
                                             step_dir.name.isdigit() else int(step_dir.name)),
                    record=step_record(step_dir))
    return params, fresh
  details = "; ".join(f"{d}: {short_error(e)}" for d, e in rejected)
  raise BrokenCheckpointError(f"{path}: no complete checkpoint ({details})")


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
  if not tree_checks.tree_is_finite(restored):
    raise ValueError("it holds non-finite parameters (never saved by the loop)")
  saved = record.get(CHECKSUMS)
  if saved:
    got = tree_checks.tree_checksums({"params": restored})
    bad = sorted(k for k in got if k in saved and got[k] != saved[k])
    if bad:
      raise ValueError(f"checksum mismatch in {len(bad)} arrays: {', '.join(bad[:3])}")
