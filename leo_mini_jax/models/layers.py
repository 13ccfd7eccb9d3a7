"""Small building blocks shared by the LEO-MINI modules (all with logical axis names)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def dense(features: int, axes: tuple[str, str], name: str, dtype: Any = jnp.float32,
          param_dtype: Any = jnp.float32, use_bias: bool = True) -> nn.Dense:
  """nn.Dense whose kernel is named `axes` (in, out) and whose bias is named `axes[-1]`."""
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]))


def learned_queries(module: nn.Module, name: str, num_queries: int, dim: int,
                    param_dtype: Any = jnp.float32) -> jax.Array:
  """A [num_queries, dim] learnable query bank (CoTR's Q_i, MQT's latent queries)."""
  return module.param(
      name, nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                         ("queries", "vision_embed")),
      (num_queries, dim), param_dtype)


def scanned(layer_cls: type[nn.Module], length: int, remat: bool, *args: Any,
            name: str) -> nn.Module:
  """`length` copies of `layer_cls(*args)` under `nn.scan`, parameters stacked on axis 0.

  `layer_cls.__call__(carry) -> (carry, None)`. One traced body whatever the depth, so
  compile time does not grow with it (CLIP-L's 24 layers, ConvNeXt-XXL's 30-block stage).
  The stacked axis has the logical name 'layers' (replicated by the sharding rules).
  """
  if remat:
    # Inside a scan the loop already keeps XLA from CSE-ing the recomputation away.
    layer_cls = nn.remat(layer_cls, prevent_cse=False)
  return nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                 length=length, metadata_params={nn.PARTITION_NAME: "layers"})(*args, name=name)
