"""models/attention.py: the padded cuDNN path equals plain attention; platform choice."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from leo_mini_jax.models import attention


def _qkv(length, keys, heads=4, kv_heads=2, head_dim=16, seed=0):
  rng = np.random.default_rng(seed)
  make = lambda n, h: jnp.asarray(rng.standard_normal((2, n, h, head_dim)), jnp.float32)
  return make(length, heads), make(keys, kv_heads), make(keys, kv_heads)


@pytest.mark.parametrize("length,keys,causal,multiple", [
    (67, 67, True, 2),    # a stage-3 row: 64 text + 4 visual - 1, causal
    (17, 17, False, 2),   # a CLIP tower's 16 patches + class token, full attention
    (21, 13, False, 8),   # cross attention, both padded
    (5, 11, True, 4),     # causal with fewer queries than keys
])
def test_padded_attention_equals_unpadded_with_gradients(length, keys, causal, multiple):
  q, k, v = _qkv(length, keys)
  weights = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)

  def loss(attend, q, k, v):
    return jnp.sum(attend(q, k, v) * weights)

  plain = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                       implementation="xla")
  padded = lambda q, k, v: attention.padded_attention(q, k, v, "xla", multiple,
                                                      is_causal=causal)
  np.testing.assert_allclose(padded(q, k, v), plain(q, k, v), rtol=1e-5, atol=1e-5)
  assert padded(q, k, v).shape == q.shape
  grads_plain = jax.grad(lambda *a: loss(plain, *a), argnums=(0, 1, 2))(q, k, v)
  grads_padded = jax.grad(lambda *a: loss(padded, *a), argnums=(0, 1, 2))(q, k, v)
  for got, want in zip(grads_padded, grads_plain):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_padded_attention_masks_padded_keys():
  # Non-causal: without the key-length mask the zero-padded key would take softmax
  # weight exp(0) and change every row.
  q, k, v = _qkv(3, 3, heads=1, kv_heads=1, head_dim=8)
  unmasked = jax.nn.dot_product_attention(
      *[jnp.pad(x, [(0, 0), (0, 1), (0, 0), (0, 0)]) for x in (q, k, v)])[:, :3]
  padded = attention.padded_attention(q, k, v, "xla", 2)
  want = jax.nn.dot_product_attention(q, k, v)
  np.testing.assert_allclose(padded, want, rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(unmasked) - np.asarray(want)).max() > 1e-3


def test_padded_attention_refuses_bias_and_mask():
  q, k, v = _qkv(3, 3)
  with pytest.raises(ValueError, match="bias and mask"):
    attention.padded_attention(q, k, v, "xla", 2, mask=jnp.ones((1, 1, 3, 3), bool))


def test_auto_follows_the_compile_target():
  bf16 = jnp.bfloat16
  assert attention.resolve("auto", bf16, 128) == "xla"  # this host is a CPU
  with attention.compile_target("gpu"):
    assert attention.resolve("auto", bf16, 128) == "cudnn"
    assert attention.resolve("auto", bf16, 128, biased=True) == "xla"
    assert attention.resolve("auto", jnp.float32, 128) == "xla"
    with attention.compile_target("tpu"):
      assert attention.resolve("auto", bf16, 128) == "xla"
    assert attention.resolve("auto", bf16, 128) == "cudnn"
  assert attention.resolve("auto", bf16, 128) == "xla"
