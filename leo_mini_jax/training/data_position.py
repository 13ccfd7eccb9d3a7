"""What a checkpoint's data position counts, and whether a resumed run reads the same stream.

The position is a count of the global train stream (all processes together), so a run
resumes with any process count. Unpacked, the stream is of examples and the record says
{'examples_seen': n}; with data.packing it is of packed rows of the global row plan
(data/packing.py) and the record says {'rows_seen': n, 'packing': the plan's spec}. The
two are different streams: n rows are not n examples, and no exact conversion exists
(a row holds a varying number of examples), so a resume that switches packing on or off
stops with an error that says what to do; a changed spec (max_length, image slots,
window) plans other rows, and is stopped or warned about as data.on_change says.
"""

import logging
from typing import Any

from leo_mini_jax import cli


class DataPositionError(cli.UserError, ValueError):
  """The checkpoint's data position counts another stream than this run reads."""


def position_record(position: int, spec: dict[str, Any] | None) -> dict[str, Any]:
  """The checkpoint fields of `position`: rows of the packed plan `spec`, or examples."""
  if spec:
    return {"rows_seen": int(position), "packing": dict(spec)}
  return {"examples_seen": int(position)}


def position_of(record: dict[str, Any], packing: bool, step: int) -> int:
  """The consumed count of a saved position record, in the unit this run counts."""
  saved_packing = "rows_seen" in record
  if saved_packing != packing:
    unit = "packed rows" if saved_packing else "examples"
    raise DataPositionError(
        f"checkpoint {step}: its data position counts {unit} (the run trained with "
        f"data.packing={saved_packing}), but this run has data.packing={packing}. A run "
        "cannot switch packing on or off mid-run: the position would point into another "
        f"stream. Resume with --config.data.packing={saved_packing}, or start a new run "
        "in another workdir from this checkpoint's parameters "
        "(--config.init_from=<this workdir>).")
  return int(record["rows_seen" if packing else "examples_seen"])


def check_packing_spec(record: dict[str, Any] | None, spec: dict[str, Any] | None,
                       on_change: str | None = "stop") -> bool:
  """Stops ('stop') or warns ('warn') when the packed row plan changed since the
  checkpoint; returns True when it did."""
  saved = (record or {}).get("packing")
  if not saved or not spec or saved == dict(spec):
    return False
  changed = ", ".join(f"{key} {saved.get(key)!r} → {spec.get(key)!r}"
                      for key in sorted(set(saved) | set(spec))
                      if saved.get(key) != spec.get(key))
  message = (f"the packed row plan changed since the checkpoint ({changed}), so data "
             f"position {record.get('rows_seen')} rows is in another stream")
  if (on_change or "stop") == "stop":
    raise DataPositionError(message + "; restore the settings, or set "
                            "config.data.on_change='warn' to go on")
  logging.warning("%s; going on (config.data.on_change='warn')", message)
  return True
