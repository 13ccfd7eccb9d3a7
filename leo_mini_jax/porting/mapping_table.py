"""The vocabulary of a weight-mapping table: tensor transforms and rules.

A `Transform` maps a source array to the parameter's layout and says, from shapes alone,
what it will produce (so a conversion is planned before any tensor is read) and, where
it can, how to map back (export). A `Rule` sends the source keys its regex matches to a
Flax path template through a transform; `mapping.convert` plans and runs a table of them
(see mapping.py for the table's semantics and an example).
"""

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np

Shape = tuple[int, ...]


# ------------------------------------------------------------------------------ transforms


@dataclasses.dataclass(frozen=True)
class Transform:
  """An array transform with its shape rule, so a conversion can be planned before reading.

  `fn` maps one numpy array to one array (or to a tuple of arrays for rules with several
  targets); `shape_fn` maps the input shape the same way and raises ValueError when the
  input shape does not fit. `invert`, where given, maps the result back exactly (used to
  export weights in the source layout).
  """
  name: str
  fn: Callable[[np.ndarray], Any]
  shape_fn: Callable[[Shape], Any]
  invert: Callable[[np.ndarray], np.ndarray] | None = None

  def __call__(self, x: np.ndarray):
    return self.fn(x)

  def out_shape(self, shape: Shape):
    return self.shape_fn(tuple(shape))


def _require_ndim(name: str, ndim: int) -> Callable[[Shape], None]:
  def check(shape: Shape) -> None:
    if len(shape) != ndim:
      raise ValueError(f"{name} expects a {ndim}-d tensor, got shape {shape}")
  return check


IDENTITY = Transform("identity", lambda x: x, lambda s: s, lambda x: x)


def transpose(*axes: int, name: str | None = None) -> Transform:
  """`np.transpose(x, axes)`."""
  check = _require_ndim(name or f"transpose{axes}", len(axes))

  def shape_fn(s: Shape) -> Shape:
    check(s)
    return tuple(s[a] for a in axes)

  back = tuple(int(a) for a in np.argsort(axes))
  return Transform(name or f"transpose{axes}", lambda x: np.transpose(x, axes), shape_fn,
                   lambda x: np.transpose(x, back))


# torch Linear weight (out, in) → Flax Dense kernel (in, out).
LINEAR = transpose(1, 0, name="linear (out,in)->(in,out)")
# torch Conv2d weight (out, in, h, w) → Flax Conv kernel (h, w, in, out).
CONV = transpose(2, 3, 1, 0, name="conv OIHW->HWIO")
# A depthwise torch conv has weight (C, 1, h, w); Flax `nn.Conv(feature_group_count=C)`
# wants (h, w, 1, C): the same permutation as an ordinary conv.
DEPTHWISE_CONV = dataclasses.replace(CONV, name="depthwise conv (C,1,H,W)->(H,W,1,C)")


def reshape(*shape: int) -> Transform:
  """`x.reshape(shape)` (one entry may be -1)."""
  def shape_fn(s: Shape) -> Shape:
    size = int(np.prod(s))
    known = int(np.prod([d for d in shape if d != -1]))
    out = tuple(size // known if d == -1 else d for d in shape)
    if int(np.prod(out)) != size:
      raise ValueError(f"cannot reshape {s} to {shape}")
    return out
  return Transform(f"reshape{shape}", lambda x: x.reshape(shape), shape_fn)


def chain(*transforms: Transform) -> Transform:
  """Applies `transforms` left to right."""
  def fn(x):
    for t in transforms:
      x = t(x)
    return x

  def shape_fn(s):
    for t in transforms:
      s = t.out_shape(s)
    return s

  def invert(x):
    for t in reversed(transforms):
      x = t.invert(x)
    return x

  invertible = all(t.invert is not None for t in transforms)
  return Transform(" then ".join(t.name for t in transforms), fn, shape_fn,
                   invert if invertible else None)


def split(num: int, axis: int = 0, then: Transform = IDENTITY) -> Transform:
  """Splits into `num` equal parts along `axis` (a fused qkv), then applies `then` to each.

  Use with a rule whose `target` is a tuple of `num` paths.
  """
  def shape_fn(s: Shape):
    if len(s) <= axis or s[axis] % num:
      raise ValueError(f"cannot split shape {s} into {num} parts along axis {axis}")
    part = s[:axis] + (s[axis] // num,) + s[axis + 1:]
    return tuple(then.out_shape(part) for _ in range(num))

  return Transform(f"split{num}(axis={axis}) then {then.name}",
                   lambda x: tuple(then(p) for p in np.split(x, num, axis=axis)), shape_fn)


# ----------------------------------------------------------------------------------- rules


@dataclasses.dataclass(frozen=True)
class Rule:
  """Source keys fully matching `source` go to `target` through `transform`.

  Attributes:
    source: regex matched with `re.fullmatch` against source tensor names; its named
      groups fill `{name}` fields of `target`.
    target: Flax path template ('a/b/kernel'), a tuple of them for transforms returning
      several arrays, or None to ignore matching keys.
    transform: applied to the source array (its result must have the parameter's shape).
    stack: named group(s) holding integer indices into leading stacked axes of the target
      (`nn.scan` layouts); a string or a tuple for nested stacks, outermost first.
    groups: optional function of the matched groups returning further (or replaced)
      groups, for targets and stacked indices computed from the source's: blocks scanned
      in repeating groups of p put layer i at `blocks_{i % p}`, stacked index i // p.
  """
  source: str
  target: str | tuple[str, ...] | None
  transform: Transform = IDENTITY
  stack: str | tuple[str, ...] = ()
  groups: Callable[[Mapping[str, str]], Mapping[str, Any]] | None = None
  _regex: re.Pattern = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    object.__setattr__(self, "_regex", re.compile(self.source))
    if isinstance(self.stack, str):
      object.__setattr__(self, "stack", (self.stack,))
    missing = [g for g in self.stack if g not in self._regex.groupindex]
    if missing and self.groups is None:
      raise ValueError(f"Rule {self.source!r}: stack group(s) {missing} are not named groups")

  @property
  def targets(self) -> tuple[str, ...]:
    if self.target is None:
      return ()
    return (self.target,) if isinstance(self.target, str) else tuple(self.target)

  def match(self, key: str) -> re.Match | None:
    return self._regex.fullmatch(key)


def ignore(pattern: str) -> Rule:
  """A rule that drops matching source keys on purpose."""
  return Rule(pattern, None)


def _has_top_level_alternation(pattern: str) -> bool:
  depth, escaped = 0, False
  for ch in pattern:
    if escaped:
      escaped = False
    elif ch == "\\":
      escaped = True
    elif ch in "([":
      depth += 1
    elif ch in ")]":
      depth -= 1
    elif ch == "|" and depth == 0:
      return True
  return False


def prefixed(rules: Sequence[Rule], source_prefix: str = "",
             target_prefix: str = "") -> list[Rule]:
  """The same table for keys under `source_prefix` and params under `target_prefix`.

  E.g. `prefixed(llama_rules(cfg), 'llm:', 'llm/')` for a `readers.CombinedReader`
  source named 'llm' and a model whose LLM params sit under 'llm/'.
  """
  out = []
  for rule in rules:
    source = rule.source
    if _has_top_level_alternation(source):
      source = f"(?:{source})"
    target = rule.target
    if target is not None:
      target = (target_prefix + target if isinstance(target, str)
                else tuple(target_prefix + t for t in target))
    out.append(dataclasses.replace(rule, source=re.escape(source_prefix) + source, target=target))
  return out
