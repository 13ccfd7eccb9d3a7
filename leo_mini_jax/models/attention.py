"""Scaled dot-product attention with the implementation chosen per platform.

`attention_impl` (LLM and CLIP configs) takes:
  * 'auto' (default): cuDNN flash attention when the program is compiled for a GPU and
    its kernel accepts the call (bf16/fp16, head_dim a multiple of 8 up to 128, no bias,
    mask or per-row key lengths), XLA elsewhere.
    `jax.nn.dot_product_attention(implementation=None)` never picks cuDNN on its own
    (automatic selection is a TODO in jax), hence this choice here.
    On a TPU, 'auto' is the Pallas splash-attention kernel (splash_attention.py) for
    causal self-attention with head_dim a multiple of 128 and no bias or mask: XLA
    would keep each layer's [B, H, T, T] scores in memory.
  * 'xla', 'cudnn': passed through (cuDNN fails at trace time where it cannot run).
  * 'splash': the splash kernel (causal self-attention only; Pallas interpret mode off
    a TPU, which is slow: for tests).
  * None: jax's own default (today always XLA).

`segment_ids` [B, T] (packed rows) restricts attention to tokens of the same segment:
splash takes them as they are, the other paths as a block-diagonal mask.

The platform is the one `compile_target` names (ahead-of-time compiles for a GPU or TPU
from a CPU host), else jax's default backend.

jax 0.10.2's cuDNN attention rejects odd sequence lengths once differentiated (its VJP
passes a placeholder bias, and biased kernels need even lengths), and LEO-MINI's rows
are 2048 + N^V - 1 tokens. On the cuDNN path the sequence is padded to an even length
inside the call: padded keys are masked (causal self-attention never reaches them),
padded queries are dropped from the output.
"""

import contextlib
import contextvars

import jax
import jax.numpy as jnp

from leo_mini_jax.models import splash_attention

IMPLEMENTATIONS = ("auto", None, "xla", "cudnn", "splash")
CUDNN_LENGTH_MULTIPLE = 2
SPLASH_HEAD_DIM_MULTIPLE = 128  # the TPU's lane width

_TARGET_PLATFORM = contextvars.ContextVar("attention_target_platform", default=None)


def check_implementation(value, field: str) -> None:
  if value not in IMPLEMENTATIONS:
    raise ValueError(f"{field}={value!r}: expected one of {IMPLEMENTATIONS}")


@contextlib.contextmanager
def compile_target(platform: str):
  """Traces inside choose attention for `platform` ('gpu', 'tpu', 'cpu').

  While tracing, jax knows only its default backend; a program lowered for devices of
  another platform (a deviceless H100 or TPU target) says which here.
  """
  token = _TARGET_PLATFORM.set(platform)
  try:
    yield
  finally:
    _TARGET_PLATFORM.reset(token)


def target_platform() -> str:
  return _TARGET_PLATFORM.get() or jax.default_backend()


def resolve(impl: str | None, dtype, head_dim: int, per_row_lengths: bool = False,
            backend: str | None = None, biased: bool = False,
            causal_self: bool = False, segmented: bool = False) -> str | None:
  """The implementation: 'splash', or the argument for `jax.nn.dot_product_attention`.

  `biased`: the call has a bias or mask. jax's cuDNN path turns a mask into a dense
  [B, H, T, S] bias in memory (no saving over XLA) and differentiates only some bias
  shapes, so 'auto' leaves those calls to XLA. `causal_self`: causal, T == S.
  `segmented`: packed rows' segment ids (a mask, except for splash).
  """
  if impl != "auto":
    return impl
  backend = backend or target_platform()
  if backend == "tpu":
    splash_ok = (causal_self and not per_row_lengths and not biased
                 and head_dim % SPLASH_HEAD_DIM_MULTIPLE == 0)
    return "splash" if splash_ok else "xla"
  biased = biased or segmented
  cudnn_ok = (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
              and head_dim % 8 == 0 and head_dim <= 128 and not per_row_lengths
              and not biased)
  return "cudnn" if backend in ("gpu", "cuda") and cudnn_ok else "xla"


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _pad_length(x: jax.Array, length: int) -> jax.Array:
  """Zero-pads axis 1 ([B, T, H, Dh]) to `length`."""
  return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def padded_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str | None,
                     multiple: int, is_causal: bool = False, **kwargs) -> jax.Array:
  """`jax.nn.dot_product_attention` with T and S padded up to `multiple`; same result.

  Padded keys get no weight: causal attention with T <= S never reaches them (query i
  sees keys j <= i < T), otherwise per-row key lengths mask them. Padded queries'
  outputs are sliced off, so they pass no gradient back.
  """
  length, keys = q.shape[1], k.shape[1]
  padded_length, padded_keys = _round_up(length, multiple), _round_up(keys, multiple)
  if (padded_length, padded_keys) == (length, keys):
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation,
                                        is_causal=is_causal, **kwargs)
  if kwargs.get("bias") is not None or kwargs.get("mask") is not None:
    raise ValueError("padded_attention: bias and mask are not padded; pass neither")
  if padded_keys != keys and not (is_causal and length <= keys):
    if kwargs.get("key_value_seq_lengths") is None:
      kwargs["key_value_seq_lengths"] = jnp.full((q.shape[0],), keys, jnp.int32)
  out = jax.nn.dot_product_attention(
      _pad_length(q, padded_length), _pad_length(k, padded_keys),
      _pad_length(v, padded_keys), implementation=implementation, is_causal=is_causal,
      **kwargs)
  return out[:, :length]


def segment_mask(segment_ids: jax.Array) -> jax.Array:
  """[B, T] segment ids → [B, 1, T, T] True where query and key share a segment."""
  return segment_ids[:, None, :, None] == segment_ids[:, None, None, :]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str | None,
                          segment_ids: jax.Array | None = None, **kwargs) -> jax.Array:
  """`jax.nn.dot_product_attention` on [B, T, H, Dh] q and [B, S, Hkv, Dh] k/v.

  `segment_ids` [B, T]: self-attention within segments only (packed rows).
  """
  implementation = resolve(
      impl, q.dtype, q.shape[-1],
      per_row_lengths=kwargs.get("key_value_seq_lengths") is not None,
      biased=kwargs.get("bias") is not None or kwargs.get("mask") is not None,
      causal_self=bool(kwargs.get("is_causal")) and q.shape[1] == k.shape[1],
      segmented=segment_ids is not None)
  if implementation == "splash":
    if set(kwargs) - {"is_causal"} or not kwargs.get("is_causal"):
      raise ValueError("attention_impl='splash' is causal self-attention without bias, "
                       f"mask or key lengths; got {sorted(kwargs)}")
    return splash_attention.causal_attention(q, k, v, segment_ids,
                                             interpret=target_platform() != "tpu")
  if segment_ids is not None:
    if kwargs.get("mask") is not None:
      raise ValueError("dot_product_attention: pass segment_ids or mask, not both")
    kwargs["mask"] = segment_mask(segment_ids)
  if implementation == "cudnn":
    return padded_attention(q, k, v, implementation, CUDNN_LENGTH_MULTIPLE, **kwargs)
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation, **kwargs)
