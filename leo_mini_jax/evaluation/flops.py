"""FLOPs of a JAX function counted from its jaxpr, with every scanned layer counted.

XLA's `compiled.cost_analysis()` counts the body of a scan (a layer stack under `nn.scan`)
once. Here the jaxpr is walked instead, and a scan body is counted `length` times. The
count is exact for the two primitives that carry the arithmetic of every layer:

  dot_general            2 · |output| · |contracted dims|   (one multiply-add = 2 FLOPs)
  conv_general_dilated   2 · batch · out_features · in_features/groups · valid taps, where
                         valid taps skip padding and dilation holes (as XLA counts them)

Elementwise work is counted apart and approximately: 1 FLOP per output element of
arithmetic, comparison, select and convert ops, 1 per input element of reductions;
transcendentals (exp, rsqrt, logistic, ...) are counted separately, as XLA does. (XLA's
own elementwise numbers differ slightly: on CPU it expands logistic and erf into several
ops, and it simplifies some away.) A while loop (trip count unknown when tracing) is
counted once and reported; of a cond, the costliest branch.

Each FLOP is attributed to a component read from the equation's name stack (Flax scopes):
see `component_of`.
"""

import collections
import dataclasses
import math
import re
from typing import Callable

import jax
import jax.extend as jex
import numpy as np

MATMUL_PRIMITIVES = ("dot_general", "conv_general_dilated")
# XLA counts these as transcendentals, not FLOPs.
TRANSCENDENTAL_PRIMITIVES = frozenset({
    "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "sin", "cos", "tan",
    "sqrt", "rsqrt", "cbrt", "pow", "erf", "erfc", "erf_inv", "atan2", "asin", "acos",
    "atan", "sinh", "cosh", "asinh", "acosh", "atanh", "lgamma", "digamma"})
ELEMENTWISE_PRIMITIVES = frozenset({
    "add", "sub", "mul", "div", "neg", "max", "min", "abs", "sign", "floor", "ceil",
    "round", "rem", "select_n", "clamp", "eq", "ne", "lt", "le", "gt", "ge", "and", "or",
    "not", "xor", "integer_pow", "square", "nextafter", "is_finite", "add_any",
    "convert_element_type"})
REDUCTION_PRIMITIVES = frozenset({
    "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
    "argmax", "argmin", "cumsum", "cummax", "cumlogsumexp", "cumprod"})
OTHER = "other"


@dataclasses.dataclass
class FlopCount:
  """FLOPs of one traced function, by component (see the module docstring)."""
  matmul: dict[str, float] = dataclasses.field(
      default_factory=lambda: collections.defaultdict(float))
  elementwise: dict[str, float] = dataclasses.field(
      default_factory=lambda: collections.defaultdict(float))
  transcendentals: float = 0.0
  while_loops: int = 0  # loops whose body was counted once (trip count unknown)

  @property
  def total_matmul(self) -> float:
    return float(sum(self.matmul.values()))

  @property
  def total_elementwise(self) -> float:
    return float(sum(self.elementwise.values()))

  def by_component(self) -> dict[str, float]:
    return {k: float(v) for k, v in sorted(self.matmul.items())}


def _size(aval) -> int:
  return math.prod(aval.shape) if hasattr(aval, "shape") else 1


def _dot_flops(eqn) -> float:
  lhs = eqn.invars[0].aval
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  contracted = math.prod(lhs.shape[d] for d in lhs_contract)
  return 2.0 * _size(eqn.outvars[0].aval) * contracted


def _valid_taps(in_size: int, kernel: int, stride: int, padding: tuple[int, int],
                lhs_dilation: int, rhs_dilation: int, out_size: int) -> int:
  """(output position, kernel tap) pairs of one spatial dim that read a real input."""
  dilated = (in_size - 1) * lhs_dilation + 1
  pos = (np.arange(out_size)[:, None] * stride - padding[0]
         + np.arange(kernel)[None, :] * rhs_dilation)
  valid = (pos >= 0) & (pos < dilated) & (pos % lhs_dilation == 0)
  return int(valid.sum())


def _conv_flops(eqn) -> float:
  lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
  out = eqn.outvars[0].aval
  p = eqn.params
  dims = p["dimension_numbers"]
  lhs_spec, rhs_spec, out_spec = dims.lhs_spec, dims.rhs_spec, dims.out_spec
  spatial = len(lhs_spec) - 2
  lhs_dil = p.get("lhs_dilation") or (1,) * spatial
  rhs_dil = p.get("rhs_dilation") or (1,) * spatial
  taps = 1
  for i in range(spatial):
    taps *= _valid_taps(lhs.shape[lhs_spec[2 + i]], rhs.shape[rhs_spec[2 + i]],
                        p["window_strides"][i], tuple(p["padding"][i]), lhs_dil[i],
                        rhs_dil[i], out.shape[out_spec[2 + i]])
  batch = out.shape[out_spec[0]]
  out_features = out.shape[out_spec[1]]
  in_per_group = rhs.shape[rhs_spec[1]]  # kernel's input-feature dim is already per group
  return 2.0 * batch * out_features * in_per_group * taps / p.get("batch_group_count", 1)


def component_of(name_stack: str, expand: tuple[str, ...] = ("vision",)) -> str:
  """The component a name stack belongs to: its first named submodule scope.

  'LeoMini.prefill/LeoMini.encode_images/vision/clip/tower/...' → 'vision/clip' (scopes in
  `expand` take their child's name too: one entry per vision expert), 'llm.prefill/...' →
  'llm'. Segments are module names or `name.method` frames; `Class.method` frames of the
  unnamed top-level module, jax transform frames and a module's calls of its own methods
  ('vision/vision._encode/clip' → 'vision/clip') are skipped. No scope → 'other'.
  """
  names = []
  for segment in name_stack.split("/"):
    segment = re.sub(r"\[.*\]$", "", segment)
    head, dot, _ = segment.partition(".")
    if not re.fullmatch(r"[A-Za-z_]\w*", head) or (dot and head[0].isupper()):
      continue  # top-level Class.method frames, jit(...)/vmap(...) and other transforms
    if dot and names and names[-1] == head:
      continue  # the module already named calling one of its own methods
    names.append(head)
  if not names:
    return OTHER
  if names[0] in expand and len(names) > 1:
    return f"{names[0]}/{names[1]}"
  return names[0]


def _closed_jaxprs(value):
  if isinstance(value, jex.core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jex.core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for item in value:
      yield from _closed_jaxprs(item)


def _walk(jaxpr, prefix: str, multiplier: float, count: FlopCount, scan_bodies_once: bool):
  for eqn in jaxpr.eqns:
    stack = str(eqn.source_info.name_stack)
    path = f"{prefix}/{stack}" if prefix and stack else (prefix or stack)
    name = eqn.primitive.name
    if name in MATMUL_PRIMITIVES:
      flops = _dot_flops(eqn) if name == "dot_general" else _conv_flops(eqn)
      count.matmul[component_of(path)] += multiplier * flops
      continue
    if name in TRANSCENDENTAL_PRIMITIVES:
      count.transcendentals += multiplier * _size(eqn.outvars[0].aval)
      continue
    if name in ELEMENTWISE_PRIMITIVES:
      count.elementwise[component_of(path)] += multiplier * _size(eqn.outvars[0].aval)
      continue
    if name in REDUCTION_PRIMITIVES:
      count.elementwise[component_of(path)] += multiplier * _size(eqn.invars[0].aval)
      continue
    if name == "scan":
      length = 1 if scan_bodies_once else eqn.params["length"]
      _walk(eqn.params["jaxpr"].jaxpr, path, multiplier * length, count, scan_bodies_once)
    elif name == "while":
      count.while_loops += 1
      _walk(eqn.params["body_jaxpr"].jaxpr, path, multiplier, count, scan_bodies_once)
    elif name == "cond":  # the costliest branch (an upper bound)
      branches = []
      for branch in eqn.params["branches"]:
        sub = FlopCount()
        _walk(branch.jaxpr, path, multiplier, sub, scan_bodies_once)
        branches.append(sub)
      _merge(count, max(branches, key=lambda c: c.total_matmul + c.total_elementwise))
    else:  # jit, remat, custom_jvp/vjp calls, ...: every inner jaxpr once
      for value in eqn.params.values():
        for sub in _closed_jaxprs(value):
          _walk(sub, path, multiplier, count, scan_bodies_once)


def _merge(into: FlopCount, other: FlopCount) -> None:
  for key, value in other.matmul.items():
    into.matmul[key] += value
  for key, value in other.elementwise.items():
    into.elementwise[key] += value
  into.transcendentals += other.transcendentals
  into.while_loops += other.while_loops


def count_flops(fn: Callable, *args, scan_bodies_once: bool = False) -> FlopCount:
  """FLOPs of `fn(*args)` from its jaxpr (args may be ShapeDtypeStructs).

  scan_bodies_once=True counts each scan body once, as XLA's cost_analysis does (used to
  check the primitive counts against XLA on the very same program).
  """
  closed = jax.make_jaxpr(fn)(*args)
  count = FlopCount()
  _walk(closed.jaxpr, "", 1.0, count, scan_bodies_once)
  return count
