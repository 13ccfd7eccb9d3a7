"""Scaled dot-product attention with the implementation chosen per platform.

`attention_impl` (LLM and CLIP configs) takes:
  * 'auto' (default): cuDNN flash attention on GPU where its kernel accepts the call
    (bf16/fp16, head_dim a multiple of 8 up to 128, no per-row key lengths), XLA
    elsewhere. `jax.nn.dot_product_attention(implementation=None)` never picks cuDNN on
    its own (automatic selection is a TODO in jax), hence this choice here.
  * 'xla', 'cudnn': passed through (cuDNN fails at trace time where it cannot run).
  * None: jax's own default (today always XLA).
"""

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", None, "xla", "cudnn")


def check_implementation(value, field: str) -> None:
  if value not in IMPLEMENTATIONS:
    raise ValueError(f"{field}={value!r}: expected one of {IMPLEMENTATIONS}")


def resolve(impl: str | None, dtype, head_dim: int, per_row_lengths: bool = False,
            backend: str | None = None) -> str | None:
  """The `implementation` argument for `jax.nn.dot_product_attention`."""
  if impl != "auto":
    return impl
  backend = backend or jax.default_backend()
  cudnn_ok = (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
              and head_dim % 8 == 0 and head_dim <= 128 and not per_row_lengths)
  return "cudnn" if backend == "gpu" and cudnn_ok else "xla"


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str | None,
                          **kwargs) -> jax.Array:
  """`jax.nn.dot_product_attention` on [B, T, H, Dh] q and [B, S, Hkv, Dh] k/v."""
  implementation = resolve(impl, q.dtype, q.shape[-1],
                           per_row_lengths=kwargs.get("key_value_seq_lengths") is not None)
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation, **kwargs)
