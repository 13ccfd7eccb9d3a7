"""Shared benchmark helpers: timing, model FLOPs, the matmul peak.

Benchmarks run as modules from the repository root: `python -m benchmarks.<name>`.
"""

import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from leo_mini_jax.evaluation import flops


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


def model_flops(fn: Callable, *args) -> float:
  """Matmul + convolution FLOPs of `fn(*args)`, every scan step counted (see flops.py).

  Elementwise work is left out: MFU is against the matmul peak.
  """
  return flops.count_flops(fn, *args).total_matmul


def matmul_peak(dtype=jnp.float32, size: int = 2048, repeats: int = 5) -> float:
  """Best FLOP/s of a [size, size] @ [size, size] matmul on the default device."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), dtype)
  dot = jax.jit(lambda x, y: x @ y)
  block(dot(a, a))
  best = min(timed(lambda: dot(a, a)) for _ in range(repeats))
  return 2.0 * size ** 3 / best
