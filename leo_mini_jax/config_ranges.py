"""The allowed range of every numeric config field, in one table, checked at start.

A value outside its range either runs wrongly without a sign (`optimizer.clip_norm=-1`
ascends the gradient, `data.num_workers=-1` is treated as 0) or fails deep inside with
an error that names nothing (`data.max_length=0`: IndexError). `check_ranges` names the
field, the value and the range.

To add a field: one line in RANGES. A field absent from a config (or None) is skipped,
so optional sections and fields other configs do not have need nothing special.
"""

import dataclasses
import math
from typing import Any


@dataclasses.dataclass(frozen=True)
class Range:
  """low <= value <= high (either side open or absent); always finite."""
  low: float | None = None
  high: float | None = None
  low_open: bool = False     # low < value
  high_open: bool = False    # value < high
  integer: bool = False

  def problem(self, value: Any) -> str | None:
    """Why `value` is out of range, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      return f"must be {'an integer' if self.integer else 'a number'} {self}"
    if self.integer and not float(value).is_integer():
      return f"must be an integer {self}"
    if not math.isfinite(value):
      return f"must be finite {self}"
    too_low = self.low is not None and (value <= self.low if self.low_open
                                        else value < self.low)
    too_high = self.high is not None and (value >= self.high if self.high_open
                                          else value > self.high)
    return f"must be {self}" if too_low or too_high else None

  def __str__(self):
    parts = []
    if self.low is not None:
      parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
    if self.high is not None:
      parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
    return " and ".join(parts) if parts else "(any finite value)"


COUNT = Range(1, integer=True)              # 1, 2, ...
COUNT_OR_OFF = Range(0, integer=True)       # 0 = off / none
POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1)
DECAY_RATE = Range(0, 1, high_open=True)    # Adam's b1, b2

RANGES: dict[str, Range] = {
    "total_steps": COUNT_OR_OFF,              # 0 = num_epochs of the usable records
    "num_epochs": POSITIVE,
    "log_every": COUNT,
    "optimizer.lr": POSITIVE,
    "optimizer.warmup_steps": NON_NEGATIVE,   # < 1: a fraction of total_steps
    "optimizer.min_lr_ratio": FRACTION,
    "optimizer.b1": DECAY_RATE,
    "optimizer.b2": DECAY_RATE,
    "optimizer.eps": POSITIVE,
    "optimizer.weight_decay": NON_NEGATIVE,
    "optimizer.clip_norm": NON_NEGATIVE,      # 0 = no clipping
    "optimizer.grad_accum_steps": COUNT,
    "data.max_length": Range(2, integer=True),  # the image placeholder and a token
    "data.resolution": COUNT,
    "data.max_image_pixels": COUNT,
    "data.max_image_bytes": COUNT,
    "data.max_aspect_ratio": Range(1),
    "data.max_truncated_fraction": FRACTION,
    "data.batch_size": COUNT,
    "data.max_images_per_row": COUNT,         # packing: image slots per row
    "data.packing_window": COUNT,             # packing: 1 = next-fit
    "data.num_workers": COUNT_OR_OFF,
    "data.read_threads": COUNT,
    "data.prefetch_batches": COUNT_OR_OFF,
    "data.num_train": COUNT,
    "data.num_eval": COUNT_OR_OFF,
    "checkpoint.every_steps": COUNT_OR_OFF,
    "checkpoint.every_seconds": NON_NEGATIVE,
    "checkpoint.keep": COUNT,
    "checkpoint.keep_period": COUNT_OR_OFF,
    "train.max_bad_steps": COUNT,
    "train.loss_chunk_length": COUNT_OR_OFF,  # 0 = the whole sequence's logits at once
    "model.vision_passes": COUNT,
    "eval.max_new_tokens": COUNT_OR_OFF,      # 0 = each benchmark's own length
    "eval.batch_size": COUNT,
    "eval.num_examples": COUNT_OR_OFF,
    "model.llm.vocab_size": COUNT,
    "model.reducer.query_init_std": POSITIVE,
}


def _lookup(config: Any, field: str) -> Any:
  node = config
  for key in field.split("."):
    if node is None or not hasattr(node, "get"):
      return None
    node = node.get(key)
  return node


class ConfigError(ValueError):
  """A config value that cannot work; the message starts with the field."""


def check_ranges(config: Any, ranges: dict[str, Range] | None = None) -> None:
  """Raises ConfigError naming the first field (in table order) out of its range."""
  for field, allowed in (RANGES if ranges is None else ranges).items():
    value = _lookup(config, field)
    if value is None:
      continue
    problem = allowed.problem(value)
    if problem:
      raise ConfigError(f"config.{field}: {problem}, got {value!r}")
