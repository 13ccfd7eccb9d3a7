"""Shared benchmark helpers: repo import path, timing, model FLOPs, the matmul peak.

Benchmarks run as scripts from the repository root (`python benchmarks/x.py`), where
Python puts `benchmarks/` (not the root) on sys.path; `ROOT` is added so `leo_mini_jax`
and `configs` import without installing anything.
"""

import importlib.util
import os
import sys
import time
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from leo_mini_jax import batch as batch_lib  # noqa: E402


def block(x):
  return jax.block_until_ready(x)


def timed(fn: Callable[[], object]) -> float:
  """Seconds one call of `fn` takes, blocked on its result."""
  start = time.perf_counter()
  block(fn())
  return time.perf_counter() - start


def alternate(fns: dict[str, Callable[[], object]], rounds: int,
              warmup: int = 1) -> dict[str, list[float]]:
  """Calls every fn once per round, in turn, so load changes hit all of them alike.

  Returns each fn's per-call seconds (warm-up calls excluded).
  """
  for _ in range(warmup):
    for fn in fns.values():
      block(fn())
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      times[name].append(timed(fn))
  return times


def median(xs) -> float:
  return float(np.median(np.asarray(xs)))


# ------------------------------------------------------------------------------- FLOPs

def _dot_flops(eqn) -> float:
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval
  contracted = int(np.prod([lhs.shape[d] for d in lhs_contract])) if lhs_contract else 1
  return 2.0 * int(np.prod(eqn.outvars[0].aval.shape)) * contracted


def _conv_flops(eqn) -> float:
  # 2 · |output| · (in_features / groups) · kernel taps (padding taps included: an upper
  # bound within a few % for the 7×7 'SAME' convolutions at these sizes).
  rhs = eqn.invars[1].aval
  dn = eqn.params["dimension_numbers"]
  kernel_spatial = [rhs.shape[d] for d in dn.rhs_spec[2:]]
  in_per_group = rhs.shape[dn.rhs_spec[1]]
  return (2.0 * int(np.prod(eqn.outvars[0].aval.shape)) * in_per_group
          * int(np.prod(kernel_spatial)))


def _sub_jaxprs(params):
  for value in params.values():
    values = value if isinstance(value, (tuple, list)) else (value,)
    for v in values:
      if isinstance(v, jax.extend.core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jax.extend.core.Jaxpr):
        yield v


def _walk(jaxpr, multiplier: float) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += multiplier * _dot_flops(eqn)
    elif name == "conv_general_dilated":
      total += multiplier * _conv_flops(eqn)
    elif name == "scan":
      total += _walk(eqn.params["jaxpr"].jaxpr, multiplier * eqn.params["length"])
    elif name == "cond":
      total += max(_walk(b.jaxpr, multiplier) for b in eqn.params["branches"])
    else:
      for sub in _sub_jaxprs(eqn.params):
        total += _walk(sub, multiplier)
  return total


def model_flops(fn: Callable, *args) -> float:
  """Matmul + convolution FLOPs of `fn(*args)` from its jaxpr, every scan step counted.

  (XLA's `cost_analysis()` counts a scan body once, so a scanned layer stack would be
  undercounted by its depth.) Elementwise work is left out: MFU is against the matmul peak.
  """
  return _walk(jax.make_jaxpr(fn)(*args).jaxpr, 1.0)


def matmul_peak(dtype=jnp.float32, size: int = 2048, repeats: int = 5) -> float:
  """Best FLOP/s of a [size, size] @ [size, size] matmul on the default device."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), dtype)
  dot = jax.jit(lambda x, y: x @ y)
  block(dot(a, a))
  best = min(timed(lambda: dot(a, a)) for _ in range(repeats))
  return 2.0 * size ** 3 / best


def synthetic_batch(config) -> dict[str, np.ndarray]:
  """A full-length batch: every row an image example with a supervised answer."""
  batch = batch_lib.dummy_batch(config, config.data.batch_size)
  rng = np.random.default_rng(0)
  batch["input_ids"][:, 2:] = rng.integers(1, 200, batch["input_ids"][:, 2:].shape)
  batch["loss_mask"][:, config.data.max_length // 2:] = 1
  batch["instruction_mask"][:, 2:config.data.max_length // 2] = 1
  batch["image"] = rng.integers(0, 256, batch["image"].shape).astype(np.uint8)
  return batch


def load_config_module(path: str):
  """The config module at `path` (a file; `get_config(arg)` is called by the caller)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--config: no such file {path}")
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
