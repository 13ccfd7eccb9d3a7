"""models/splash_attention.py: the TPU splash kernel (Pallas interpret mode on this CPU)
gives XLA's causal attention, with packed rows' segment ids, padding and a mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from leo_mini_jax.models import attention
from leo_mini_jax.models import splash_attention
from leo_mini_jax.parallel import mesh as mesh_lib


def _qkv(batch=1, length=130, heads=2, kv_heads=1, head_dim=128, seed=0):
  rng = np.random.default_rng(seed)
  make = lambda h: jnp.asarray(rng.standard_normal((batch, length, h, head_dim)),
                               jnp.float32)
  return make(heads), make(kv_heads), make(kv_heads)


def _packed_ids(batch, length):
  """Two examples and a padding tail per row (segment 0, as the batch contract pads)."""
  first = length // 3
  ids = np.zeros((batch, length), np.int32)
  ids[:, :first] = 1
  ids[:, first:length - 7] = 2
  return jnp.asarray(ids)


def _xla(q, k, v, segment_ids=None):
  mask = None if segment_ids is None else attention.segment_mask(segment_ids)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                      implementation="xla")


def _splash(q, k, v, segment_ids=None):
  return splash_attention.causal_attention(q, k, v, segment_ids, interpret=True)


def _assert_same_with_gradients(got_fn, want_fn, q, k, v, *extra):
  weights = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
  np.testing.assert_allclose(got_fn(q, k, v, *extra), want_fn(q, k, v, *extra),
                             rtol=1e-4, atol=1e-5)
  grad = lambda fn: jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, *extra) * weights),
                             argnums=(0, 1, 2))(q, k, v)
  for got, want in zip(grad(got_fn), grad(want_fn)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_splash_equals_xla_on_packed_rows_with_gradients():
  # 130 tokens: padded to 256 inside (the kernel's 128-token blocks); GQA 2 heads : 1.
  q, k, v = _qkv()
  ids = _packed_ids(1, 130)
  _assert_same_with_gradients(_splash, _xla, q, k, v, ids)
  # The segments matter: plain causal attention differs on the second example.
  assert np.abs(np.asarray(_xla(q, k, v)) - np.asarray(_xla(q, k, v, ids))).max() > 1e-2


@pytest.mark.slow
def test_splash_equals_xla_causal_without_segments():
  q, k, v = _qkv(batch=2, length=256, heads=4, kv_heads=2)
  _assert_same_with_gradients(_splash, _xla, q, k, v)


@pytest.mark.parametrize("batch", [2, 1])  # 1: fewer rows than 'data' devices
def test_splash_runs_per_shard_under_a_mesh(batch):
  # batch over 'data', heads over 'tensor': the kernel sees one shard's rows and heads.
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 1, "tensor": 2},
                            devices=jax.devices()[:4])
  q, k, v = _qkv(batch=batch, length=128, heads=4, kv_heads=2)
  ids = _packed_ids(batch, 128)

  def splash_fn(q, k, v, ids):
    with mesh_lib.activate(mesh):
      return attention.dot_product_attention(q, k, v, "splash", segment_ids=ids,
                                             is_causal=True)

  put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data" if batch > 1 else None)))
  got = jax.jit(splash_fn)(*map(put, (q, k, v, ids)))
  np.testing.assert_allclose(got, _xla(q, k, v, ids), rtol=1e-4, atol=1e-5)
  text = jax.jit(splash_fn).lower(*map(put, (q, k, v, ids))).as_text()
  assert "shard_map" in text or "sdy.manual_computation" in text


def test_segment_ids_mask_the_xla_path():
  q, k, v = _qkv(length=20, head_dim=16)
  ids = _packed_ids(1, 20)
  got = attention.dot_product_attention(q, k, v, "xla", segment_ids=ids, is_causal=True)
  np.testing.assert_allclose(got, _xla(q, k, v, ids), rtol=1e-6)
  # The second example attends as if alone in its row.
  alone = _xla(q[:, 6:13], k[:, 6:13], v[:, 6:13])
  np.testing.assert_allclose(got[:, 6:13], alone, rtol=1e-5, atol=1e-6)


def test_auto_picks_splash_on_tpu_for_causal_self_attention_only():
  bf16 = jnp.bfloat16
  with attention.compile_target("tpu"):
    assert attention.resolve("auto", bf16, 128, causal_self=True) == "splash"
    assert attention.resolve("auto", bf16, 128, causal_self=True, segmented=True) == "splash"
    assert attention.resolve("auto", jnp.float32, 256, causal_self=True) == "splash"
    assert attention.resolve("auto", bf16, 64, causal_self=True) == "xla"  # lane width
    assert attention.resolve("auto", bf16, 128) == "xla"  # a vision tower: full attention
    assert attention.resolve("auto", bf16, 128, causal_self=True, biased=True) == "xla"
    assert attention.resolve("auto", bf16, 128, causal_self=True,
                             per_row_lengths=True) == "xla"  # decoding
  with attention.compile_target("gpu"):
    assert attention.resolve("auto", bf16, 128, causal_self=True) == "cudnn"
    assert attention.resolve("auto", bf16, 128, causal_self=True, segmented=True) == "xla"
  assert attention.resolve("auto", bf16, 128, causal_self=True) == "xla"  # this CPU


def test_splash_refuses_what_it_cannot_compute():
  q, k, v = _qkv(length=8, head_dim=16)
  with pytest.raises(ValueError, match="causal self-attention"):
    attention.dot_product_attention(q, k, v, "splash", is_causal=False)
  with pytest.raises(ValueError, match="self-attention"):
    splash_attention.causal_attention(q, k[:, :4], v[:, :4])
  with pytest.raises(ValueError, match="not both"):
    attention.dot_product_attention(q, k, v, "xla", segment_ids=jnp.ones((1, 8), int),
                                    mask=jnp.ones((1, 1, 8, 8), bool))
