"""Declarative weight mapping: a table of rules from source tensor names to Flax paths.

A port is a list of `Rule`s. Each rule says: source keys matching this regex go to this
Flax path (a template filled from the regex's named groups), through this transform.
A rule with `stack=('layer',)` gathers the per-layer keys `...layers.{layer}...` into one
array with a leading layer axis, as `nn.scan` lays its parameters out; without `stack`
the template names one parameter per layer (`layers_{layer}/...`). A rule with target
`None` ignores matching keys on purpose (buffers such as `rotary_emb.inv_freq`).

    rules = [
        Rule(r"model\.embed_tokens\.weight", "embed_tokens/embedding"),
        Rule(r"model\.layers\.(?P<layer>\d+)\.self_attn\.q_proj\.weight",
             "layers/attention/q_proj/kernel", LINEAR, stack="layer"),
        Rule(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", None),
    ]
    params = convert(open_checkpoint(path), rules, abstract_params(model, ids))

`convert` first plans the whole conversion from names and shapes alone (no tensor data is
read) and checks it against the model's abstract parameter tree: every missing,
unexpected and shape-mismatched key is collected and reported together in one
`PortError`. Only a complete plan is executed; it then reads one source tensor at a time,
transforms it, casts it to the parameter dtype and writes it into its place, so the host
holds about one copy of the weights (in the target dtype) plus one source tensor.

Paths are '/'-joined Flax parameter paths relative to the tree passed as `expected`
(e.g. 'layers/mlp/up_proj/kernel').

`Rule` and the transforms (`LINEAR`, `CONV`, `split`, ...) are defined in mapping_table.py
and importable from here; this module checks, plans and runs a table.
"""

import dataclasses
import itertools
import re
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np

# The table's vocabulary (mapping_table.py), importable from here as ports always have.
from leo_mini_jax.porting.mapping_table import (CONV, DEPTHWISE_CONV, IDENTITY, LINEAR, Rule,
                                                Transform, chain, ignore, prefixed, reshape,
                                                split, transpose)


# ---------------------------------------------------------------------------------- errors


class PortError(ValueError):
  """A checkpoint does not fit the model; lists every missing, unexpected and mismatched key."""

  def __init__(self, source: str, missing: Sequence[str] = (), unexpected: Sequence[str] = (),
               mismatched: Sequence[str] = ()):
    self.source = source
    self.missing = list(missing)
    self.unexpected = list(unexpected)
    self.mismatched = list(mismatched)
    lines = [f"checkpoint {source} does not fit the model:"]
    for title, items in (("missing (model parameters no checkpoint tensor provides)", self.missing),
                         ("unexpected (checkpoint tensors the model has no place for)",
                          self.unexpected),
                         ("shape mismatch", self.mismatched)):
      if items:
        lines.append(f"  {len(items)} {title}:")
        lines.extend(f"    {item}" for item in items)
    super().__init__("\n".join(lines))


# ------------------------------------------------------------------------------ tree utils


def flatten_tree(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested dict → {'a/b/c': leaf}; flax boxed metadata (nn.Partitioned) is unboxed."""
  tree = nn.meta.unbox(tree)
  flat = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten_tree(value, path + "/"))
    else:
      flat[path] = value
  return flat


def unflatten_tree(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{'a/b/c': leaf} → nested dict."""
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def abstract_params(model: nn.Module, *init_args, rng=None, **init_kwargs) -> dict[str, Any]:
  """`params` of `jax.eval_shape(model.init, ...)`, unboxed (ShapeDtypeStructs, no memory)."""
  rng = jax.random.key(0) if rng is None else rng
  variables = jax.eval_shape(lambda r: model.init(r, *init_args, **init_kwargs), rng)
  return nn.meta.unbox(variables["params"])


def init_filler(init_params: Callable[[], Mapping[str, Any]]) -> Callable[[Sequence[str]], dict]:
  """A `fill` for `convert` that initialises only the requested parameters.

  `init_params()` returns the model's params tree (e.g. `lambda: model.init(rng, x)
  ['params']`); under `jax.jit` the initialisers of parameters that are not requested are
  dead code and never run, so filling a small new module costs no full-model init.
  """
  def fill(paths: Sequence[str]) -> dict[str, Any]:
    paths = list(paths)
    return jax.jit(lambda: {p: flatten_tree(init_params())[p] for p in paths})()
  return fill


# -------------------------------------------------------------------------------- planning


@dataclasses.dataclass(frozen=True)
class _Assignment:
  key: str  # source tensor name
  rule: Rule
  part: int  # which output of the transform (0 unless the rule has several targets)
  target: str
  index: tuple[int, ...]  # position along the stacked axes (empty when not stacked)


def source_key(rule: Rule, groups: Mapping[str, str]) -> str:
  """The source key a rule matches for these group values, e.g. 'model.layers.1.mlp.up_proj.weight'.

  Written out from the regex (escaped literals, named groups, optional `(?:prefix)?`
  groups shown present); 'a key matching ...' when the regex is not that plain.
  """
  text = re.sub(r"\(\?P<(\w+)>(?:[^()]|\([^()]*\))*\)", r"{\1}", rule.source)
  # An optional prefix such as (?:model\.)? is shown present (the common layout).
  text = re.sub(r"\(\?:([^()|]*)\)\?", r"\1", text)
  if re.search(r"(?<!\\)[\[\]()*+?|^$]", text):
    return f"a key matching {rule.source!r}"
  text = re.sub(r"\\(.)", r"\1", text).replace("\\d", "")
  try:
    return text.format(**groups)
  except (KeyError, IndexError, ValueError):
    return text


def _expected_source(rules: Sequence[Rule], target: str, index: tuple[int, ...]) -> str:
  """Which source key the table would map to `target[index]`, for error messages."""
  for rule in rules:
    for template in rule.targets:
      pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
      m = re.fullmatch(pattern, target)
      if m:
        groups = dict(m.groupdict())
        groups.update({name: str(i) for name, i in zip(rule.stack, index)})
        return source_key(rule, groups)
  return ""


def _fmt_index(rule_or_names, index: tuple[int, ...]) -> str:
  if not index:
    return ""
  names = rule_or_names.stack if isinstance(rule_or_names, Rule) else rule_or_names
  return "[" + ", ".join(f"{n}={i}" for n, i in zip(names, index)) + "]"


def plan(reader, rules: Sequence[Rule], expected: Mapping[str, Any],
         allow_missing: str | None = None):
  """Checks the conversion from names and shapes only.

  Returns (assignments, allowed_missing) where allowed_missing maps target path → list of
  stacked indices left to the fill ([()] for a whole unstacked target). Raises PortError
  listing every problem.
  """
  expected = flatten_tree(expected)
  missing, unexpected, mismatched = [], [], []
  assignments: list[_Assignment] = []
  slots: dict[tuple[str, tuple[int, ...]], str] = {}
  stack_names: dict[str, tuple[str, ...]] = {}
  reported: set[tuple[str, tuple[int, ...]]] = set()  # mismatched slots, not also "missing"
  for key in reader.keys():
    rule = m = None
    for candidate in rules:
      m = candidate.match(key)
      if m:
        rule = candidate
        break
    if rule is None:
      unexpected.append(f"{key}: no mapping rule matches it")
      continue
    if rule.target is None:
      continue
    groups = m.groupdict()
    if rule.groups is not None:
      groups.update({k: str(v) for k, v in rule.groups(groups).items()})
    index = tuple(int(groups[name]) for name in rule.stack)
    try:
      out_shapes = rule.transform.out_shape(reader.shape(key))
    except ValueError as e:
      mismatched.append(f"{key} {reader.shape(key)}: {e}")
      continue
    if len(rule.targets) > 1:
      if not isinstance(out_shapes, tuple) or len(out_shapes) != len(rule.targets):
        raise ValueError(f"Rule {rule.source!r}: transform {rule.transform.name} must give "
                         f"{len(rule.targets)} arrays, one per target")
    else:
      out_shapes = (out_shapes,)
    for part, (template, out_shape) in enumerate(zip(rule.targets, out_shapes)):
      target = template.format(**groups)
      where = f"{target}{_fmt_index(rule, index)}"
      if target not in expected:
        unexpected.append(f"{key}: maps to {target}, which the model does not have")
        continue
      stack_names.setdefault(target, rule.stack)
      exp_shape = tuple(expected[target].shape)
      depth = len(index)
      if len(exp_shape) < depth:
        mismatched.append(f"{where}: model shape {exp_shape} has no {depth} stacked axes ({key})")
        continue
      if any(i >= n for i, n in zip(index, exp_shape[:depth])):
        unexpected.append(
            f"{key}: maps to {where}, beyond the model's stacked size {exp_shape[:depth]}")
        continue
      if tuple(out_shape) != exp_shape[depth:]:
        reported.add((target, index))
        mismatched.append(
            f"{where}: checkpoint {key} has shape {tuple(reader.shape(key))} → {tuple(out_shape)} "
            f"after {rule.transform.name}, model expects {exp_shape[depth:]}")
        continue
      if (target, index) in slots:
        unexpected.append(f"{key}: maps to {where}, which {slots[target, index]} already provides")
        continue
      slots[target, index] = key
      assignments.append(_Assignment(key, rule, part, target, index))

  filled_indices: dict[str, set] = {}
  for target, index in [*slots, *reported]:
    filled_indices.setdefault(target, set()).add(index)
  allowed: dict[str, list[tuple[int, ...]]] = {}
  for target, struct in expected.items():
    have = filled_indices.get(target, set())
    if have:
      depth = len(next(iter(have)))
      absent = [i for i in itertools.product(*(range(n) for n in struct.shape[:depth]))
                if i not in have]
    else:
      absent = [()]
    if not absent:
      continue
    if allow_missing is not None and re.fullmatch(allow_missing, target):
      allowed[target] = absent
      continue
    for index in absent:
      names = stack_names.get(target, ())
      source = _expected_source(rules, target, index)
      missing.append(f"{target}{_fmt_index(names, index)} "
                     + (f"(expected from {source})" if source else "(no rule in the table maps to it)"))
  if missing or unexpected or mismatched:
    raise PortError(repr(reader), missing, unexpected, mismatched)
  return assignments, allowed


# ------------------------------------------------------------------------------- executing

# `fill=OMIT`: leave allowed-missing parameters out of the result (for a checkpoint whose
# reader, e.g. train.py's init_from, initialises them itself).
OMIT = "omit"


def convert(reader, rules: Sequence[Rule], expected: Mapping[str, Any], *,
            allow_missing: str | None = None,
            fill: Mapping[str, Any] | Callable[[Sequence[str]], Mapping[str, Any]] | None = None,
            shardings: Mapping[str, Any] | None = None,
            to_device: bool = True) -> dict[str, Any]:
  """Builds the params tree `expected` describes from the checkpoint `reader`.

  Args:
    reader: a `readers.CheckpointReader` (keys/shape/get).
    rules: the mapping table; the first rule whose regex fully matches a key applies.
    expected: the abstract params tree (e.g. `abstract_params(model, ...)`; boxed
      Partitioned metadata is unboxed). Its dtypes are the dtypes the values are cast to.
    allow_missing: regex (re.fullmatch on the '/' path) of parameters that may be absent
      from the checkpoint (new modules); they are taken from `fill`.
    fill: values for the allowed-missing parameters: a params tree (e.g. a fresh init), or
      a callable taking the list of missing paths and returning {path: array}
      (`init_filler`), or `OMIT` to leave them out of the result. Required when anything
      allowed is actually missing.
    shardings: optional tree (like `expected`) of `jax.sharding.Sharding`s; each finished
      parameter is placed with it and its host copy dropped.
    to_device: without shardings, put each finished parameter on the default device
      (False keeps numpy arrays).

  Returns:
    A nested dict of arrays with exactly the paths, shapes and dtypes of `expected`
    (less the allowed-missing ones with `fill=OMIT`).

  Raises:
    PortError listing every missing, unexpected and shape-mismatched key, before any
    tensor data is read.
  """
  expected_flat = flatten_tree(expected)
  assignments, allowed = plan(reader, rules, expected_flat, allow_missing)
  sharding_flat = flatten_tree(shardings) if shardings is not None else {}

  fill_values: dict[str, Any] = {}
  if allowed and isinstance(fill, str) and fill == OMIT:
    partial = sorted({a.target for a in assignments if a.target in allowed})
    if partial:
      raise ValueError(f"parameters {partial} are only partly in the checkpoint: they cannot "
                       "be omitted; pass `fill` values for their missing slots")
    allowed = {}  # the caller asked for the allowed-missing parameters to be left out
  if allowed:
    if fill is None:
      raise ValueError(f"parameters {sorted(allowed)} are missing (allowed by "
                       f"{allow_missing!r}) but no `fill` values were given")
    fill_values = dict(fill(sorted(allowed))) if callable(fill) else flatten_tree(fill)
    absent = sorted(set(allowed) - set(fill_values))
    if absent:
      raise ValueError(f"`fill` has no values for missing parameters {absent}")

  out: dict[str, Any] = {}
  pending: dict[str, int] = {}  # target → stacked slots still to be written
  for a in assignments:
    pending[a.target] = pending.get(a.target, 0) + 1

  def finish(target: str, value: np.ndarray) -> None:
    if target in sharding_flat or to_device:
      placed = jax.device_put(value, sharding_flat.get(target))
      # Wait for the copy so the host buffer is freed now, not when transfers pile up.
      out[target] = placed.block_until_ready()
    else:
      out[target] = value

  def buffer(target: str) -> np.ndarray:
    if target not in out:
      struct = expected_flat[target]
      out[target] = np.empty(struct.shape, np.dtype(struct.dtype))
      if target in allowed:  # stacked target, some slots left to the fill
        src = np.asarray(fill_values[target])
        for index in allowed[target]:
          out[target][index] = src[index]
    return out[target]

  # Read each source key once (a key may feed several targets), in reader order.
  by_key: dict[str, list[_Assignment]] = {}
  for a in assignments:
    by_key.setdefault(a.key, []).append(a)
  for key, group in by_key.items():
    value = group[0].rule.transform(reader.get(key))
    parts = value if len(group[0].rule.targets) > 1 else (value,)
    for a in group:
      struct = expected_flat[a.target]
      part = np.asarray(parts[a.part]).astype(np.dtype(struct.dtype), copy=False)
      if not a.index:
        if part.shape != tuple(struct.shape):  # a transform whose shape_fn disagrees with fn
          raise ValueError(f"{key} → {a.target}: transform gave {part.shape}, "
                           f"planned {tuple(struct.shape)}")
        finish(a.target, np.ascontiguousarray(part))
        continue
      buf = buffer(a.target)
      buf[a.index] = part
      pending[a.target] -= 1
      if pending[a.target] == 0:
        finish(a.target, out.pop(a.target))
    del value, parts

  for target in allowed:
    if target in out:  # partially stacked target; its slots were filled in `buffer`
      continue
    struct = expected_flat[target]
    value = np.asarray(fill_values[target])
    if value.shape != tuple(struct.shape):
      raise ValueError(f"`fill` value for {target} has shape {value.shape}, "
                       f"model expects {tuple(struct.shape)}")
    finish(target, value.astype(np.dtype(struct.dtype), copy=False))
  return unflatten_tree(out)


__all__ = ["PortError", "flatten_tree", "unflatten_tree", "abstract_params", "init_filler",
           "source_key", "plan", "OMIT", "convert",
           "Transform", "IDENTITY", "LINEAR", "CONV", "DEPTHWISE_CONV", "transpose", "reshape",
           "chain", "split", "Rule", "ignore", "prefixed"]
