"""Whole-tree checks that the trainer and every checkpoint reader share.

`all_finite` / `tree_is_finite`: every float leaf is finite (one device reduction).
`tree_checksums`: per leaf, the sum of its bits read as unsigned integers modulo 2^32:
exact integer sums, so they do not depend on the mesh or the order of reduction, and a
single changed bit changes them (orbax reads a flipped byte in an uncompressed chunk
without complaint).
"""

from typing import Any

import jax
import jax.numpy as jnp


@jax.jit
def all_finite(tree: Any) -> jax.Array:
  """A device bool: every float leaf of `tree` is finite (usable inside a jitted step)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def tree_is_finite(tree: Any) -> bool:
  """True when every float leaf of `tree` is finite (one device reduction, one sync)."""
  return bool(all_finite(tree))


def _leaf_checksum(x: jax.Array) -> jax.Array:
  bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  if x.dtype == jnp.bool_:
    words = x.astype(jnp.uint32)
  elif x.dtype.itemsize == 8:  # 64-bit leaves (x64 mode): two 32-bit words each
    words = jax.lax.bitcast_convert_type(x, jnp.uint32)
  else:
    words = jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32)
  return jnp.sum(words, dtype=jnp.uint32)


@jax.jit
def _checksums(tree: Any) -> Any:
  return jax.tree.map(_leaf_checksum, tree)


def tree_checksums(tree: Any) -> dict[str, int]:
  """{key path: checksum} of a tree (a subtree of the state keeps the state's keys)."""
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(_checksums(tree)))[0]
  return {jax.tree_util.keystr(path): int(value) for path, value in flat}
