"""Splitting a batch into sequential parts that each stay spread over every device.

The global batch is sharded over the data-parallel devices in contiguous row blocks, so
contiguous parts would each sit on 1/parts of the devices (the rest idle, plus a
reshard). Part p instead takes rows p, p + parts, p + 2·parts, ...: with rows / devices
divisible by `parts`, every part keeps rows / (parts · devices) rows on each device, and
the reshape splits no device's block (no communication). Gradient accumulation splits
micro-batches this way (training/step.py), and the vision experts their passes over a
batch's images (models/leo_mini.py).
"""

import jax
import jax.numpy as jnp


def strided_split(x: jax.Array, parts: int) -> jax.Array:
  """[N, ...] → [parts, N / parts, ...]; part p holds rows p, p + parts, ..."""
  rows = x.shape[0]
  if rows % parts:
    raise ValueError(f"{rows} rows do not split into {parts} parts")
  return jnp.swapaxes(x.reshape((rows // parts, parts) + x.shape[1:]), 0, 1)


def strided_merge(x: jax.Array) -> jax.Array:
  """strided_split's inverse: [parts, N / parts, ...] → [N, ...] in the original order."""
  return jnp.swapaxes(x, 0, 1).reshape((x.shape[0] * x.shape[1],) + x.shape[2:])
