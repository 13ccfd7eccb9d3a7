"""Resuming from the latest *complete* checkpoint, and a metrics log without duplicates.

What a restart after a hard kill finds in `<workdir>/checkpoints`:
  - finished steps (orbax commits a step by renaming its temporary directory, so a save
    killed half-way leaves only a `<step>.orbax-checkpoint-tmp-*` directory, which
    orbax does not list as a step);
  - possibly a finished step whose files were damaged afterwards (a truncated copy, a
    full disk, bit rot).

`restore_complete` tries the latest step, then earlier ones, and accepts a step only
when orbax reads it without error, the restored tree matches the abstract state (same
paths, shapes and dtypes), its step counter is the step, every float is finite (the loop
never saves a non-finite state) and the per-leaf checksums saved beside it match. A
rejected step is named in the log and renamed `<step>.broken-<time>` (kept for
inspection, out of the way of the next save of that step). If no step passes, nothing
is renamed and the run stops with an error naming the directory: the cause is then more
likely a config that does not fit the checkpoints than damage to all of them.

Checksums are exact per-leaf bit sums (`tree_checks.tree_checksums`): a single changed
bit changes them, whatever the mesh.

`truncate_metrics` drops metrics.jsonl rows after the restored step, a half-written
last line and repeated steps, so after any number of restarts the file holds one row per
logged step.
"""

import json
import logging
import time
from typing import Any

from etils import epath
import jax
from jax.experimental import multihost_utils

from leo_mini_jax import checkpoints as checkpoints_lib
from leo_mini_jax import tree_checks


def state_checksums(state: Any) -> dict[str, int]:
  """{"['params']['llm']...": checksum} over the train state's leaves (one small fetch)."""
  return tree_checks.tree_checksums(
      {"step": state.step, "params": state.params, "opt_state": state.opt_state})


def _tree_differences(restored: Any, abstract: Any) -> list[str]:
  got = jax.tree_util.tree_flatten_with_path(restored)[0]
  want = jax.tree_util.tree_flatten_with_path(abstract)[0]
  got = {jax.tree_util.keystr(p): x for p, x in got}
  want = {jax.tree_util.keystr(p): x for p, x in want}
  problems = [f"missing {p}" for p in sorted(set(want) - set(got))]
  problems += [f"unexpected {p}" for p in sorted(set(got) - set(want))]
  for p in sorted(set(got) & set(want)):
    g, w = got[p], want[p]
    if tuple(g.shape) != tuple(w.shape) or g.dtype != w.dtype:
      problems.append(f"{p}: restored {g.dtype}{list(g.shape)}, expected "
                      f"{w.dtype}{list(w.shape)}")
  return problems


def check_restored(state: Any, abstract_state: Any, step: int,
                   position: dict | None) -> None:
  """Raises ValueError saying what is wrong with a restored checkpoint of `step`."""
  problems = _tree_differences(state, abstract_state)
  if problems:
    raise ValueError("restored tree does not match the train state: "
                     + "; ".join(problems[:5]))
  if int(state.step) != step:
    raise ValueError(f"its step counter is {int(state.step)}, not {step}")
  if not tree_checks.tree_is_finite((state.params, state.opt_state)):
    raise ValueError("it holds non-finite values (never saved by the loop)")
  saved = (position or {}).get(checkpoints_lib.CHECKSUMS)
  if saved:
    got = state_checksums(state)
    bad = sorted(k for k in saved if got.get(k) != saved[k])
    if bad:
      raise ValueError(f"checksum mismatch in {len(bad)} arrays: {', '.join(bad[:3])}")


def restore_complete(checkpointer: Any, abstract_state: Any, step: int | None = None
                     ) -> tuple[Any, int]:
  """(state, step) of the latest checkpoint at or before `step` that restores intact.

  Args:
    checkpointer: a `checkpoint.Checkpointer`.
    abstract_state: ShapeDtypeStructs with the target shardings.
    step: the newest step to try (default: the latest).

  Raises:
    BrokenCheckpointError naming the directory (and each step's problem) when no
    step passes.
  """
  steps = sorted((s for s in checkpointer.all_steps() if step is None or s <= step),
                 reverse=True)
  rejected = []
  for candidate in steps:
    try:
      state = checkpointer.restore(candidate, abstract_state)
      check_restored(state, abstract_state, candidate,
                     checkpointer.data_position(candidate))
    except Exception as e:  # pylint: disable=broad-except
      logging.error("checkpoint %s is broken (%s); trying the previous one",
                    checkpointer.directory / str(candidate), checkpoints_lib.short_error(e))
      rejected.append((candidate, e))
      continue
    if rejected:
      set_aside(checkpointer, [s for s, _ in rejected])
      logging.warning("resuming from checkpoint %s, the latest complete one",
                      checkpointer.directory / str(candidate))
    return state, candidate
  details = "; ".join(f"step {s}: {checkpoints_lib.short_error(e)}" for s, e in rejected) or "no steps"
  raise checkpoints_lib.BrokenCheckpointError(
      f"no complete checkpoint in {checkpointer.directory} ({details}). If the config "
      "changed since these were written, use another workdir (or init_from)")


def set_aside(checkpointer: Any, steps: list[int]) -> None:
  """Renames broken steps `<step>.broken-<time>` (process 0) so the run can save them
  again; the manager then re-reads its step list."""
  stamp = time.strftime("%Y%m%d-%H%M%S")
  if jax.process_index() == 0:
    for step in steps:
      source = checkpointer.directory / str(step)
      target = checkpointer.directory / f"{step}.broken-{stamp}"
      source.rename(target)
      logging.warning("moved the broken checkpoint %s to %s", source, target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("leo_mini_jax:set_aside_broken_checkpoints")
  checkpointer.manager.reload()


def truncate_metrics(workdir: str, step: int) -> int:
  """Keeps one metrics.jsonl row per step <= `step` (process 0); returns rows dropped.

  Dropped: rows past `step` (a killed run logged them), a line that does not parse (cut
  by a kill mid-write), and all but the last row of a step logged twice (two runs on
  one workdir before the lock, or a restart before the first checkpoint).
  """
  path = epath.Path(workdir) / "metrics.jsonl"
  if jax.process_index() != 0 or not path.exists():
    return 0
  lines = path.read_text().splitlines()
  by_step = {}
  for line in lines:
    try:
      row_step = int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
      continue
    if row_step <= step:
      by_step[row_step] = line + "\n"  # the later row of a step wins
  kept = [by_step[s] for s in sorted(by_step)]
  dropped = len(lines) - len(kept)
  if dropped:
    path.write_text("".join(kept))
    logging.info("metrics.jsonl: dropped %d rows (after step %d, cut or repeated)",
                 dropped, step)
  return dropped


def read_metrics(workdir: str) -> dict[int, dict]:
  """{step: row} from metrics.jsonl, the last row of a step winning."""
  rows = {}
  for line in (epath.Path(workdir) / "metrics.jsonl").read_text().splitlines():
    try:
      row = json.loads(line)
    except ValueError:
      continue
    rows[int(row["step"])] = row
  return rows


def check_init_from(path: str) -> None:
  """Fails naming `path` when it holds nothing `checkpoints.load_params` can read."""
  root = epath.Path(path)
  if not root.exists():
    raise FileNotFoundError(f"config.init_from: {path} does not exist")
  steps = root / "checkpoints"
  if steps.is_dir():
    if not any(d.name.isdigit() for d in steps.iterdir()):
      raise FileNotFoundError(f"config.init_from: {steps} holds no finished checkpoint")
    return
  markers = ("_METADATA", "manifest.ocdbt", "_CHECKPOINT_METADATA", "state")
  if not root.is_dir() or not any((root / m).exists() for m in markers):
    raise FileNotFoundError(
        f"config.init_from: {path} holds no checkpoint (expected a train workdir with "
        "checkpoints/<step>/, a step directory with state/, or a params checkpoint "
        "written by porting.convert)")


def warn_skipped_stage(source: dict, stage: int) -> bool:
  """Warns (and returns True) when `init_from` read a run more than one stage before
  `stage` (stage 1 into stage 3 skips the projector-and-reducer training of stage 2).

  `source` is what `checkpoints.load_params` filled; its record names the source stage
  (checkpoints from before the stage was recorded, and ports, say nothing).
  """
  from_stage = (source.get("record") or {}).get("stage")
  if from_stage is None or int(from_stage) >= int(stage) - 1:
    return False
  logging.warning("init_from %s is a stage-%d checkpoint, initialising stage %d: stage "
                  "%d is skipped", source.get("path"), int(from_stage), int(stage),
                  int(from_stage) + 1)
  return True


class DataChangedError(RuntimeError):
  """The usable records differ from those the checkpoint's data position counts."""


def check_data_fingerprint(position: dict | None, fingerprint: str,
                           on_change: str | None = "stop") -> bool:
  """Stops (on_change 'stop', the default) or warns ('warn') when the records changed
  since the checkpoint; returns True when they did. Checkpoints without a fingerprint
  pass."""
  saved = (position or {}).get("data_fingerprint")
  if not saved or saved == fingerprint:
    return False
  on_change = on_change or "stop"
  if on_change not in ("stop", "warn"):
    raise ValueError(f"config.data.on_change: must be 'stop' or 'warn', got {on_change!r}")
  message = (f"the usable data records changed since the checkpoint (fingerprint {saved} "
             f"→ {fingerprint}: a record or image added, removed or fixed), so data "
             f"position {(position or {}).get('examples_seen')} is in another order")
  if on_change == "stop":
    raise DataChangedError(message + "; restore the data, or set config.data.on_change="
                           "'warn' to go on")
  logging.warning("%s; going on (config.data.on_change='warn')", message)
  return True
