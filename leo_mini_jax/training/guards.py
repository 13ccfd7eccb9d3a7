"""Non-finite steps: never applied, counted, and a run that keeps producing them stops.

A step whose loss (cross-entropy or balance term) or gradient norm is NaN/inf, or
whose update would make a trainable parameter or the optimizer state NaN/inf (finite
gradients with an infinite learning rate, an overflowing moment), is dropped inside the
jitted step: a `jnp.where` per leaf keeps the previous parameters
and optimizer state (Adam moments and the schedule's step count included), so the
guard costs no host synchronisation and the state stays finite. The step counter still
advances, as does the data stream: the batch that produced the NaN is skipped, not
retried.

On the host, `NonFiniteTracker` reads the per-step flag from the fetched metrics,
counts the skipped steps, and raises `NonFiniteError` naming the step once
`train.max_bad_steps` steps in a row were non-finite. `check_finite_state` is the last
line before a checkpoint: a state with a non-finite parameter is never saved.
"""

import logging
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from leo_mini_jax import cli
from leo_mini_jax import tree_checks

# Checked per step; all are scalars the step computes anyway.
CHECKED_METRICS = ("loss", "balance_loss", "grad_norm")
DEFAULT_MAX_BAD_STEPS = 10


class NonFiniteError(cli.UserError, RuntimeError):
  """Too many non-finite steps in a row, or a non-finite state about to be saved."""


def skip_nonfinite(train_step: Callable, trainable: Any) -> Callable:
  """Wraps `train_step(state, batch) -> (state, metrics)` so a non-finite step is a no-op.

  Args:
    train_step: from `step.make_train_step` (pure; jit the result).
    trainable: bool tree over params; frozen leaves are returned by the step unchanged,
      so only trainable leaves (and the optimizer state) need the select.

  The returned metrics gain `nonfinite` (1.0 when the step was dropped, else 0.0) and
  `nonfinite_update` (1.0 when the new parameters or optimizer state were the cause).
  """

  def guarded(state, batch):
    new_state, metrics = train_step(state, batch)
    finite_metrics = jnp.all(jnp.stack([jnp.isfinite(metrics[name])
                                        for name in CHECKED_METRICS if name in metrics]))
    # Finite gradients can still give a non-finite update: check what would be kept.
    new_trainable = [p for p, m in zip(jax.tree.leaves(new_state.params),
                                       jax.tree.leaves(trainable)) if m]
    finite_update = tree_checks.all_finite((new_trainable, new_state.opt_state))
    finite = finite_metrics & finite_update
    keep = lambda new, old: jnp.where(finite, new, old)
    params = jax.tree.map(lambda new, old, m: keep(new, old) if m else new,
                          new_state.params, state.params, trainable)
    opt_state = jax.tree.map(keep, new_state.opt_state, state.opt_state)
    metrics = dict(metrics, nonfinite=1.0 - finite.astype(jnp.float32),
                   nonfinite_update=1.0 - finite_update.astype(jnp.float32))
    return new_state.replace(params=params, opt_state=opt_state), metrics

  return guarded


def max_bad_steps(config: Any) -> int:
  """`config.train.max_bad_steps` (default DEFAULT_MAX_BAD_STEPS)."""
  train_cfg = config.get("train") or {}
  return int(train_cfg.get("max_bad_steps", DEFAULT_MAX_BAD_STEPS))


class NonFiniteTracker:
  """Counts dropped steps from fetched metrics; raises after `max_bad` in a row.

  `observe` adds `skipped_steps` (dropped steps so far in this process) to every row,
  so the logged metrics show how many updates were lost.
  """

  def __init__(self, max_bad: int):
    if max_bad < 1:
      raise ValueError(f"config.train.max_bad_steps: must be >= 1, got {max_bad}")
    self.max_bad = max_bad
    self.total = 0
    self.in_a_row = 0
    self.last_good_step: int | None = None

  def observe(self, rows: Sequence[dict[str, float]], first_step: int) -> None:
    """`rows[i]` holds the scalar metrics of step `first_step + i` (1-based, as logged)."""
    for offset, row in enumerate(rows):
      step = first_step + offset
      if row.get("nonfinite", 0.0) > 0:
        self.total += 1
        self.in_a_row += 1
        logging.warning(
            "step %d: non-finite %s; the update was not applied (%d in a row, %d in all)",
            step, _cause(row), self.in_a_row, self.total)
      else:
        self.in_a_row = 0
        self.last_good_step = step
      row["skipped_steps"] = float(self.total)
      if self.in_a_row >= self.max_bad:
        since = ("the start of this run" if self.last_good_step is None
                 else f"step {self.last_good_step}")
        raise NonFiniteError(
            f"step {step}: {self.in_a_row} non-finite steps in a row "
            f"(config.train.max_bad_steps={self.max_bad}; last: {_cause(row)}); no "
            f"update since {since} was applied, and no checkpoint was written from a "
            "non-finite state")


def _cause(row: dict[str, float]) -> str:
  """What was non-finite in a dropped step's metrics row."""
  values = ", ".join(f"{k}={row[k]}" for k in CHECKED_METRICS if k in row)
  if row.get("nonfinite_update", 0.0) > 0:
    return f"update (new parameters or optimizer state; {values})"
  return values


def check_finite_state(state: Any, step: int) -> None:
  """Raises NonFiniteError when any float leaf of `state` is NaN/inf (before a save)."""
  if not bool(tree_checks.all_finite((state.params, state.opt_state))):
    raise NonFiniteError(f"step {step}: the train state holds non-finite values; "
                         "refusing to write a checkpoint from it")
