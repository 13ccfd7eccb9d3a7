"""Turning ml_collections configs into typed, hashable module configs.

Flax modules take frozen dataclasses (hashable, so they can be jit-static and scan-safe);
config files write ConfigDicts. `from_config` is the one bridge between the two: it
rejects unknown fields by name, converts lists to tuples and builds nested dataclasses.
"""

import dataclasses
import typing
from typing import Any, Mapping, TypeVar

from leo_mini_jax import cli

T = TypeVar("T")


def to_plain(value: Any) -> Any:
  """ConfigDict / FrozenConfigDict / Mapping → dict; lists → tuples (recursively)."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {k: to_plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(to_plain(v) for v in value)
  return value


def _dataclass_type(annotation: Any) -> type | None:
  """The dataclass inside `X`, `X | None` or `Optional[X]`, if any."""
  if dataclasses.is_dataclass(annotation):
    return annotation
  for arg in typing.get_args(annotation):
    if dataclasses.is_dataclass(arg):
      return arg
  return None


def from_config(cls: type[T], cfg: Any, **overrides: Any) -> T:
  """Builds dataclass `cls` from a ConfigDict/dict, naming any unknown field."""
  if isinstance(cfg, cls):
    return dataclasses.replace(cfg, **overrides) if overrides else cfg
  values = dict(to_plain(cfg) if cfg is not None else {})
  values.update(overrides)
  hints = typing.get_type_hints(cls)
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    hints = "".join(cli.did_you_mean(name, known) for name in unknown)
    raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}{hints}; known fields are "
                     f"{sorted(known)}")
  for name, value in list(values.items()):
    nested = _dataclass_type(hints.get(name))
    if nested is not None and isinstance(value, Mapping):
      values[name] = from_config(nested, value)
  try:
    return cls(**values)
  except TypeError as e:
    raise ValueError(f"{cls.__name__}: {e}") from None
