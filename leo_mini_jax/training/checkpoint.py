"""Checkpoints with orbax: the train state and the grain iterator side by side.

Layout of a run's workdir:

    <workdir>/checkpoints/<step>/state       TrainState as {'step', 'params', 'opt_state'}
    <workdir>/checkpoints/<step>/data_iter   grain iterator state (JSON)

A parameters-only checkpoint (what `porting.convert` writes, and what `init_from` also
accepts) is an orbax PyTree checkpoint directory holding {'params': ...}.

Restores always go into abstract targets that carry the *current* shardings, so a run can
resume on a different mesh.
"""

import os
import re
from typing import Any

import grain
from flax import traverse_util
import orbax.checkpoint as ocp

STATE, DATA_ITER = "state", "data_iter"


class Checkpointer:
  """Keep-N + keep-period, async saves, iterator state beside the train state."""

  def __init__(self, workdir: str, cfg: Any):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep, keep_period=cfg.get("keep_period") or None,
        enable_async_checkpointing=bool(cfg.get("async_save", True)), create=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE: ocp.StandardCheckpointHandler(),
                       DATA_ITER: grain.checkpoint.CheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iter: Any | None = None) -> None:
    items = {STATE: ocp.args.StandardSave(_state_dict(state))}
    if data_iter is not None:
      items[DATA_ITER] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state: Any, data_iter: Any | None = None) -> Any:
    """Restores into `abstract_state` (ShapeDtypeStructs with shardings); the iterator in place."""
    items = {STATE: ocp.args.StandardRestore(_state_dict(abstract_state))}
    if data_iter is not None:
      items[DATA_ITER] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return type(abstract_state)(**restored[STATE])

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def _state_dict(state: Any) -> dict:
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


def save_params(path: str, params: Any) -> None:
  """Writes a parameters-only checkpoint ({'params': params}) at `path`."""
  checkpointer = ocp.PyTreeCheckpointer()
  checkpointer.save(os.path.abspath(path), args=ocp.args.PyTreeSave({"params": params}),
                    force=True)


def _params_item_dir(path: str) -> str:
  """The orbax directory holding {'params': ...} for a workdir, a step or a params dir."""
  path = os.path.abspath(path)
  manager_dir = os.path.join(path, "checkpoints")
  if os.path.isdir(manager_dir):
    steps = [int(d) for d in os.listdir(manager_dir) if d.isdigit()]
    if not steps:
      raise FileNotFoundError(f"init_from: no checkpoint under {manager_dir}")
    return os.path.join(manager_dir, str(max(steps)), STATE)
  if os.path.isdir(os.path.join(path, STATE)):
    return os.path.join(path, STATE)
  if os.path.isdir(path):
    return path
  raise FileNotFoundError(f"init_from: {path} does not exist")


def _flat(tree: Any) -> dict[str, Any]:
  return traverse_util.flatten_dict(dict(tree), sep="/")


def load_params(path: str, abstract_params: Any, fresh_params: Any = None,
                allow_missing: str = r"$^") -> tuple[Any, list[str]]:
  """Initialises a run from another run's (or a port's) parameters.

  Args:
    path: a train workdir (its latest step), a step directory, or a params checkpoint.
    abstract_params: ShapeDtypeStructs with the target shardings (plain tree).
    fresh_params: freshly initialised params (same tree) used for what may be missing
      (needed only when something is).
    allow_missing: regex (full match) of parameter paths that may be absent and stay fresh.

  Returns:
    (params, the paths initialised fresh).

  Raises:
    ValueError naming every missing (not allowed), unexpected and shape-mismatched path.
  """
  item_dir = _params_item_dir(path)
  metadata = ocp.PyTreeCheckpointer().metadata(item_dir)
  tree = getattr(metadata, "item_metadata", metadata)
  tree = getattr(tree, "tree", tree)
  if "params" not in tree:
    raise ValueError(f"init_from: {item_dir} holds no 'params' (keys: {sorted(tree)})")
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
        lines.append(f"  {title} ({len(items)}): " + ", ".join(items))
    raise ValueError("\n".join(lines))
  fresh_paths = sorted(p for p in wanted if p not in saved)
  subset = traverse_util.unflatten_dict(
      {p: x for p, x in wanted.items() if p in saved}, sep="/")
  restored = ocp.PyTreeCheckpointer().restore(
      item_dir, args=ocp.args.PyTreeRestore(
          item={"params": subset},
          restore_args=ocp.checkpoint_utils.construct_restore_args({"params": subset}),
          partial_restore=True))["params"]
  merged = _flat(fresh_params) if fresh_paths else {}
  merged.update(_flat(restored))
  return traverse_util.unflatten_dict(merged, sep="/"), fresh_paths
