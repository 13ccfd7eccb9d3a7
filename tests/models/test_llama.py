"""LLaMA decoder: KV cache, scan vs unrolled, causality, rotary, parameter counts."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from leo_mini_jax.config_utils import from_config
from leo_mini_jax.models import llama
from leo_mini_jax.models import rotary

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
            num_kv_heads=2, rope_theta=500.0)


def _model(**overrides):
  cfg = from_config(llama.LlamaConfig, {**TINY, **overrides})
  model = llama.LlamaForCausalLM(cfg)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (3, 9)), jnp.int32)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), ids))["params"]
  return model, params, ids


@pytest.mark.parametrize("overrides", [
    {},
    {"tie_embeddings": True, "num_kv_heads": None},
    {"scan_layers": False},
    {"rope_scaling": dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8)},
])
def test_kv_cache_decoding_reproduces_full_forward(overrides):
  model, params, ids = _model(**overrides)
  full = np.asarray(model.apply({"params": params}, ids))
  prompt_lengths = np.array([2, 4, 5])
  embeds = model.apply({"params": params}, ids, method=model.embed)
  # Right-padded prompts: rows hold garbage after their length.
  prompts = jnp.where(jnp.arange(9)[None, :, None] < prompt_lengths[:, None, None],
                      embeds, 7.0)
  logits, cache, _ = model.apply({"params": params}, prompts, jnp.asarray(prompt_lengths),
                                 12, method=model.prefill)
  rows = np.arange(3)
  np.testing.assert_allclose(np.asarray(logits), full[rows, prompt_lengths - 1], atol=1e-5)
  positions = prompt_lengths.copy()
  decode = jax.jit(lambda p, t, c: model.apply({"params": p}, t, c,
                                               method=model.decode_step))
  while positions.max() < 9:
    tokens = ids[rows, np.minimum(positions, 8)]
    logits, cache, _ = decode(params, tokens, cache)
    for row in rows:
      if positions[row] < 9:
        np.testing.assert_allclose(np.asarray(logits[row]), full[row, positions[row]],
                                   atol=1e-5)
    positions += 1
  np.testing.assert_array_equal(np.asarray(cache["lengths"]), positions)


def test_scanned_and_unrolled_layers_agree():
  model, params, ids = _model()
  unrolled_model, unrolled_init, _ = _model(scan_layers=False)
  unrolled = {k: v for k, v in params.items() if k != "layers"}
  for i in range(TINY["num_layers"]):
    unrolled[f"layers_{i}"] = jax.tree.map(lambda x: x[i], params["layers"])
  assert jax.tree.structure(unrolled) == jax.tree.structure(unrolled_init)
  np.testing.assert_allclose(np.asarray(unrolled_model.apply({"params": unrolled}, ids)),
                             np.asarray(model.apply({"params": params}, ids)), atol=1e-5)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_policies_do_not_change_values_or_gradients(policy):
  model, params, ids = _model()
  remat_model, _, _ = _model(remat_policy=policy)
  loss = lambda m: lambda p: jnp.mean(m.apply({"params": p}, ids) ** 2)
  g1 = jax.grad(loss(model))(params)
  g2 = jax.grad(loss(remat_model))(params)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_causal_masking():
  model, params, ids = _model()
  base = np.asarray(model.apply({"params": params}, ids))
  changed_ids = ids.at[:, 5:].set((ids[:, 5:] + 1) % 64)
  changed = np.asarray(model.apply({"params": params}, changed_ids))
  np.testing.assert_allclose(changed[:, :5], base[:, :5], atol=1e-6)
  assert np.abs(changed[:, 5:] - base[:, 5:]).max() > 1e-4


def test_rotary_matches_closed_form():
  cfg = from_config(llama.LlamaConfig, TINY)
  dim = cfg.dim_per_head
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 4, 1, dim)).astype(np.float32)
  positions = np.array([[0, 1, 5, 17]])
  out = np.asarray(rotary.apply_rotary(jnp.asarray(x), jnp.asarray(positions),
                                      llama.rope_inverse_frequencies(cfg)))
  half = dim // 2
  for t, pos in enumerate(positions[0]):
    for i in range(half):
      angle = pos * TINY["rope_theta"] ** (-2 * i / dim)
      a, b = x[0, t, 0, i], x[0, t, 0, i + half]
      np.testing.assert_allclose(out[0, t, 0, i], a * math.cos(angle) - b * math.sin(angle),
                                 atol=1e-5)
      np.testing.assert_allclose(out[0, t, 0, i + half],
                                 b * math.cos(angle) + a * math.sin(angle), atol=1e-5)


def test_llama3_rope_scaling_matches_reference_formula():
  scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                 original_max_position_embeddings=8192)
  cfg = from_config(llama.LlamaConfig, dict(vocab_size=8, hidden_size=4096,
                                            intermediate_size=8, num_layers=1, num_heads=32,
                                            rope_theta=500000.0, rope_scaling=scaling))
  got = np.asarray(llama.rope_inverse_frequencies(cfg))
  base = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
  want = []
  for freq in base:  # Meta's reference apply_scaling, written per frequency
    wavelen = 2 * math.pi / freq
    if wavelen < 8192 / 4.0:
      want.append(freq)
    elif wavelen > 8192 / 1.0:
      want.append(freq / 8.0)
    else:
      smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
      want.append((1 - smooth) * freq / 8.0 + smooth * freq)
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("shape,expected", [
    (dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
          num_heads=32), 6_738_415_616),  # Vicuna-7B v1.5
    (dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
          num_heads=32, num_kv_heads=8), 8_030_261_248),  # Llama-3-8B
])
def test_full_size_parameter_counts(shape, expected):
  model = llama.LlamaForCausalLM(from_config(llama.LlamaConfig, shape))
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))
  assert sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(abstract))) == expected


def test_every_parameter_has_logical_axes():
  model = llama.LlamaForCausalLM(from_config(llama.LlamaConfig, {
      **TINY, "mmoe": dict(enabled=True, router_inputs="hidden")}))
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))
  leaves = jax.tree.leaves(abstract["params"],
                           is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  assert all(len(x.names) == x.value.ndim for x in leaves)


def test_bad_config_names_the_field():
  with pytest.raises(ValueError, match="num_kv_heads"):
    from_config(llama.LlamaConfig, {**TINY, "num_kv_heads": 3})
  with pytest.raises(ValueError, match="unknown field.*hidden"):
    from_config(llama.LlamaConfig, {**TINY, "hidden": 3})
  with pytest.raises(ValueError, match="remat_policy"):
    from_config(llama.LlamaConfig, {**TINY, "remat_policy": "some"})


def test_decode_step_updates_the_cache_in_place():
  """The compiled decode step (cache donated) writes the new token's slots with a scatter:
  no full-cache copy, zero-filled buffer or dynamic-update-slice of a stacked cache."""
  model, params, ids = _model()
  embeds = model.apply({"params": params}, ids, method=model.embed)
  _, cache, _ = model.apply({"params": params}, embeds, jnp.asarray([2, 4, 5]), 16,
                            method=model.prefill)
  step = jax.jit(lambda p, t, c: model.apply({"params": p}, t, c, method=model.decode_step),
                 donate_argnums=2)
  hlo = step.lower(params, ids[:, 0], cache).compile().as_text()
  full = "f32[3,3,16,2,8]"  # [layers, batch, slots, kv heads, head dim]
  writes = [line for line in hlo.splitlines() if f"= {full}" in line]
  assert any("scatter" in line for line in writes), writes
  wasteful = [line.strip()[:120] for line in writes
              if any(op in line for op in (" copy(", " broadcast(", "dynamic-update-slice"))]
  assert not wasteful, wasteful


def test_logits_are_float32_under_bfloat16_compute():
  for tie in (False, True):
    model, params, ids = _model(dtype="bfloat16", tie_embeddings=tie)
    logits = model.apply({"params": params}, ids)
    assert logits.dtype == jnp.float32
    # Not bf16-rounded: float32 logits carry more than bf16's 8 mantissa bits.
    assert np.any(np.asarray(logits) != np.asarray(logits.astype(jnp.bfloat16), np.float32))


def test_attention_impl_auto_picks_cudnn_on_gpu_only_where_it_can_run():
  from leo_mini_jax.models import attention
  bf16, f32 = jnp.bfloat16, jnp.float32
  assert attention.resolve("auto", bf16, 128, backend="gpu") == "cudnn"
  assert attention.resolve("auto", f32, 128, backend="gpu") == "xla"
  assert attention.resolve("auto", bf16, 96, per_row_lengths=True, backend="gpu") == "xla"
  assert attention.resolve("auto", bf16, 256, backend="gpu") == "xla"
  assert attention.resolve("auto", bf16, 128, backend="tpu") == "xla"
  assert attention.resolve("auto", bf16, 128, backend="cpu") == "xla"
  assert attention.resolve("cudnn", f32, 128, backend="cpu") == "cudnn"  # asked for: kept
  assert llama.LlamaConfig(**TINY).attention_impl == "auto"
  with pytest.raises(ValueError, match="llm.attention_impl"):
    from_config(llama.LlamaConfig, {**TINY, "attention_impl": "flash"})
