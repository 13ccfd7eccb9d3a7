"""What a vision expert's weight port module provides (`register_expert(..., port=...)`).

A port is a module, `leo_mini_jax/porting/<name>.py`, named by its expert's registration
and imported on first use (`porting.vision_port`). Its members, as `typing.Protocol`s so
that a type checker and `missing_members` read the same contract:

  <name>_rules(...)   the mapping table (`mapping.Rule`s) from the reference checkpoint's
                      keys to the tower's parameter paths (its arguments are the port's own)
  ExpertPort          load_expert, RUN_FIELDS, open_source: every port
  EaglePort           eagle_rules as well: a port whose expert has EAGLE tower names

`run_fields` and `config_free` build the two members most ports spell the same way.
"""

import dataclasses
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from leo_mini_jax.models.vision import experts
from leo_mini_jax.porting import mapping
from leo_mini_jax.porting import readers


@runtime_checkable
class ExpertPort(Protocol):
  """The members `load_vision_expert` and `porting.convert --expert` use."""

  # Config fields the checkpoint does not determine (taken from the run's config).
  RUN_FIELDS: Sequence[str]

  def load_expert(self, path: Any, **kwargs: Any) -> tuple[Any, Any]:
    """Checkpoint → (tower module, params) (`porting.load_vision_expert`)."""

  def open_source(self, path: str, cfg: Any, overrides: dict
                  ) -> tuple[readers.CheckpointReader, list[mapping.Rule], Any]:
    """(reader, rules, the config the checkpoint implies) for `porting.convert`."""


@runtime_checkable
class EaglePort(ExpertPort, Protocol):
  """A port whose tower an EAGLE release holds (`porting.eagle`)."""

  def eagle_rules(self, cfg: Any) -> list[mapping.Rule]:
    """The table for the tower's keys as an EAGLE release stores them, relative to the
    reference model's root (the release's prefix is added by the caller)."""


# Config fields no checkpoint holds: how the tower normalises its input and computes.
# Every port's RUN_FIELDS has those of them its config has.
RUNTIME_FIELDS = ("mean", "std", "dtype", "param_dtype", "remat", "attention_impl",
                  "scan_layers")


def run_fields(config_cls: type, *fields: str) -> tuple[str, ...]:
  """A port's RUN_FIELDS: `fields`, the tower's own fields its checkpoint does not
  determine, then the RUNTIME_FIELDS that `config_cls` has."""
  names = {field.name for field in dataclasses.fields(config_cls)}
  return (*fields, *(name for name in RUNTIME_FIELDS if name in names))


def config_free(table: Callable[[], list[mapping.Rule]]
                ) -> Callable[[Any], list[mapping.Rule]]:
  """`eagle_rules` of a port whose EAGLE table is `table()` whatever the run's config
  (the release stores the tower as its reference checkpoint does)."""

  def eagle_rules(cfg: Any) -> list[mapping.Rule]:
    del cfg
    return table()
  return eagle_rules


def members(protocol: type) -> tuple[str, ...]:
  """The public members a protocol declares, its bases' included."""
  names = set()
  for cls in protocol.__mro__:
    if cls in (Protocol, object) or not getattr(cls, "_is_protocol", False):
      continue
    names.update(n for n in (*vars(cls), *getattr(cls, "__annotations__", {}))
                 if not n.startswith("_"))
  return tuple(sorted(names))


def protocol_of(name: str) -> type:
  """The protocol the port of registered expert `name` must satisfy."""
  return EaglePort if experts.expert_spec(name).eagle_towers else ExpertPort


def missing_members(name: str, module: Any) -> list[str]:
  """The members of its contract that the port module of expert `name` lacks."""
  protocol = protocol_of(name)
  wanted = [f"{name}_rules", *members(protocol)]
  return [member for member in wanted if not hasattr(module, member)]


__all__ = ["ExpertPort", "EaglePort", "RUNTIME_FIELDS", "run_fields", "config_free", "members",
           "protocol_of", "missing_members"]
