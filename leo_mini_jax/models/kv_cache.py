"""The LLM's KV cache: {'k', 'v': [layers, B, S, Hkv, Dh]} and, between calls, 'lengths' [B].

The cache travels through the layer scan as part of the carry, and each layer writes its
own entry in place: a dynamic-update-slice at prefill, a scatter of one token per row at
decode. Passed as scanned input/output instead, the whole cache would be copied through
the scan on every generated token.
"""

import jax
import jax.numpy as jnp

Array = jax.Array


def empty(num_layers: int, batch: int, size: int, kv_heads: int, head_dim: int,
          dtype) -> dict[str, Array]:
  """Zero keys and values for `size` slots per row."""
  shape = (num_layers, batch, size, kv_heads, head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def write_prompt(cache: dict, layer: Array | int, keys: Array, values: Array) -> dict:
  """Prefill: `layer`'s entry takes keys/values [B, T, Hkv, Dh] at slots [0, T)."""
  return {name: jax.lax.dynamic_update_slice(cache[name], new.astype(cache[name].dtype)[None],
                                             (layer, 0, 0, 0, 0))
          for name, new in (("k", keys), ("v", values))}


def append(cache: dict, layer: Array | int, lengths: Array, keys: Array,
           values: Array) -> dict:
  """Decode: row b's T new keys/values [B, T, Hkv, Dh] go to slots lengths[b] onwards."""
  batch, length = keys.shape[:2]
  rows = jnp.arange(batch)[:, None]
  slots = lengths[:, None] + jnp.arange(length)[None, :]
  return {name: cache[name].at[layer, rows, slots].set(new.astype(cache[name].dtype))
          for name, new in (("k", keys), ("v", values))}
