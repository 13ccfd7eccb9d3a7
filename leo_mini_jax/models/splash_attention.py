"""Causal self-attention through the TPU's Pallas splash-attention kernel.

XLA's attention on TPU materialises each layer's [B, H, T, T] scores and probabilities
(forward, and again when full remat recomputes the layer in the backward pass); the
splash kernel (jax.experimental.pallas.ops.tpu.splash_attention) works block by block
and keeps only the per-row log-sum-exp. It takes grouped-query heads as they are and
packed rows' segment ids (block-diagonal causal masks).

The kernel needs the sequence in whole blocks: rows are padded to a multiple of BLOCK.
Padded keys are never attended (causal: a real query i sees keys j <= i); padded
queries see themselves, so their softmax is valid, and are sliced off.

Under a mesh the kernel runs per shard (`jax.shard_map`: a Pallas call is not split by
the SPMD partitioner) with the activations' batch and head shardings; a sequence split
over a mesh axis is gathered first. Off a TPU it runs in Pallas interpret mode (tests).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

BLOCK = 128
Q_AXES = ("activation_batch", "activation_length", "activation_heads", None)
KV_AXES = ("activation_batch", "activation_length", "activation_kv_heads", None)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _kernel(heads: int, length: int, interpret: bool):
  mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * heads)
  return splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1,
                                block_sizes=splash.BlockSizes.get_default(),
                                interpret=interpret)


def _local(q, k, v, segment_ids, interpret: bool):
  """[B, T, H, Dh] q, [B, T, Hkv, Dh] k/v of one shard; T a multiple of BLOCK."""
  heads, head_dim = q.shape[2], q.shape[3]
  kernel = _kernel(heads, q.shape[1], interpret)
  q = q * jnp.asarray(1 / math.sqrt(head_dim), q.dtype)  # splash does not scale
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)
  if segment_ids is None:
    out = jax.vmap(kernel)(heads_first(q), heads_first(k), heads_first(v))
  else:
    ids = jax.vmap(splash.SegmentIds)(segment_ids, segment_ids)
    out = jax.vmap(lambda q, k, v, ids: kernel(q, k, v, segment_ids=ids))(
        heads_first(q), heads_first(k), heads_first(v), ids)
  return heads_first(out)


def _spec(axes, shape, mesh) -> jax.sharding.PartitionSpec:
  """The activation spec of `axes`, the sequence whole, and any dimension its mesh axes
  do not divide (a batch of 1 on 4 devices) whole too: shard_map needs even shards."""
  spec = list(nn.logical_to_mesh_axes(axes))
  spec[1] = None
  for dim, entry in enumerate(spec):
    names = (entry,) if isinstance(entry, str) else tuple(entry or ())
    if shape[dim] % math.prod(mesh.shape[name] for name in names):
      spec[dim] = None
  return jax.sharding.PartitionSpec(*spec)


def _sharded(fn, q_shape, kv_shape, segmented: bool):
  """`fn` per shard of the current mesh, or `fn` itself where no mesh is set."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn
  q_spec, kv_spec = _spec(Q_AXES, q_shape, mesh), _spec(KV_AXES, kv_shape, mesh)
  if q_spec[0] != kv_spec[0]:
    q_spec = kv_spec = jax.sharding.PartitionSpec()  # never with the default rules
  ids_spec = jax.sharding.PartitionSpec(q_spec[0], None)
  in_specs = (q_spec, kv_spec, kv_spec) + ((ids_spec,) if segmented else ())
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=q_spec,
                       check_vma=False)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     segment_ids: jax.Array | None = None,
                     interpret: bool = False) -> jax.Array:
  """Causal GQA self-attention: [B, T, H, Dh] q, [B, T, Hkv, Dh] k/v → [B, T, H, Dh].

  `segment_ids` [B, T]: tokens attend only within their segment (packed rows).
  `interpret`: Pallas interpret mode (any backend; slow), for programs not built for a TPU.
  """
  if k.shape[1] != q.shape[1]:
    raise ValueError(f"splash attention is self-attention: q has {q.shape[1]} tokens, "
                     f"k {k.shape[1]}")
  length = q.shape[1]
  padded = _round_up(length, BLOCK)
  pad = lambda x: jnp.pad(x, [(0, 0), (0, padded - length)] + [(0, 0)] * (x.ndim - 2))
  args = [pad(q), pad(k), pad(v)]
  if segment_ids is not None:
    args.append(pad(segment_ids.astype(jnp.int32)))
  segmented = segment_ids is not None

  def local(q, k, v, ids=None):
    return _local(q, k, v, ids, interpret)

  out = _sharded(local, args[0].shape, args[1].shape, segmented)(*args)
  return out[:, :length]
