"""Small building blocks shared by the LEO-MINI modules (all with logical axis names).

The vision towers, the reducers and the LLM build their dense, convolution and norm
layers here, so each kind of layer initialises and names its parameters one way.
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from leo_mini_jax.parallel import axes as ax

# Logical axes of the arrays the vision towers pass along.
TOKEN_AXES = (ax.ACTIVATION_BATCH, ax.ACTIVATION_VISION_TOKENS, ax.ACTIVATION_VISION_EMBED)
MAP_AXES = (ax.ACTIVATION_BATCH, None, None, ax.ACTIVATION_VISION_EMBED)  # [B, H, W, C]
# Convolution kernels [kh, kw, in, out]; a patch embedding's output is the tower's width.
CONV_AXES = (ax.CONV_HEIGHT, ax.CONV_WIDTH, ax.CONV_IN, ax.CONV_OUT)
PATCH_EMBED_AXES = (ax.CONV_HEIGHT, ax.CONV_WIDTH, ax.CONV_IN, ax.VISION_EMBED)
# Dense kernels [in, out] of a vision transformer block.
QKV_AXES = (ax.VISION_EMBED, ax.VISION_HEADS)
ATTN_OUT_AXES = (ax.VISION_HEADS, ax.VISION_EMBED)
MLP_IN_AXES = (ax.VISION_EMBED, ax.VISION_MLP)
MLP_OUT_AXES = (ax.VISION_MLP, ax.VISION_EMBED)


def dense(features: int, axes: tuple[str, str], name: str, dtype: Any = jnp.float32,
          param_dtype: Any = jnp.float32, use_bias: bool = True) -> nn.Dense:
  """nn.Dense whose kernel is named `axes` (in, out) and whose bias is named `axes[-1]`."""
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]))


def conv(features: int, kernel: int, name: str, dtype: Any = jnp.float32,
         param_dtype: Any = jnp.float32, *, stride: int = 1, padding: Any = "VALID",
         groups: int = 1, use_bias: bool = True,
         axes: tuple[str, ...] = CONV_AXES) -> nn.Conv:
  """Square nn.Conv on NHWC; kernel named `axes`, bias named `axes[-1]`."""
  return nn.Conv(
      features, (kernel, kernel), strides=(stride, stride), padding=padding,
      feature_group_count=groups, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]))


def layer_norm(name: str, eps: float, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32) -> nn.LayerNorm:
  """LayerNorm over the last axis with scale and bias named 'norm'.

  use_fast_variance=False: E[x²]−E[x]² loses digits on a large residual stream. On NHWC
  maps this is timm's / HF's LayerNorm2d on NCHW.
  """
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, (ax.NORM,)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (ax.NORM,)))


class RMSNorm(nn.Module):
  """x / rms(x) · scale over the last axis; scale [C] starts at one, named `axis_name`.

  Statistics in float32; the result is cast to `dtype` before the scale (HF LLaMA and
  T5 do the same), so with dtype=float32 it is all float32.
  """
  eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  axis_name: str = ax.NORM

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
        (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return jnp.asarray(scale, self.dtype) * x32.astype(self.dtype)


def mlp(x: jax.Array, hidden: int, features: int, activation: Callable[[jax.Array], jax.Array],
        names: tuple[str, str], dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32) -> jax.Array:
  """names[1](activation(names[0](x))): a transformer block's two-layer MLP.

  Call it inside a compact method: the two dense layers become the caller's children.
  """
  h = dense(hidden, MLP_IN_AXES, names[0], dtype, param_dtype)(x)
  return dense(features, MLP_OUT_AXES, names[1], dtype, param_dtype)(activation(h))


class Mlp(nn.Module):
  """`mlp` as a module of its own (the towers' 'mlp' submodule)."""
  hidden: int
  features: int
  activation: Callable[[jax.Array], jax.Array]
  names: tuple[str, str] = ("fc1", "fc2")
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return mlp(x, self.hidden, self.features, self.activation, self.names, self.dtype,
               self.param_dtype)


def exact_gelu(x: jax.Array) -> jax.Array:
  """GELU in its erf form (torch's nn.GELU() default), as jax.nn.gelu computes it."""
  return nn.gelu(x, approximate=False)


class PerExpertModule(nn.Module):
  """Base of the modules over all experts' feature maps (the reducers, CoTR).

  Fields: the module's config, the experts' names (they prefix the per-expert
  parameters), the compute and parameter dtypes.
  """
  config: Any
  expert_names: tuple[str, ...]
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32


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
