"""CoTR against an independent NumPy implementation of Eq. 2–7 (docs/design.md §2.2)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from leo_mini_jax.models import cotr as cotr_lib
from leo_mini_jax.models import reducers

TEXT_DIM = 12
COTR_DIM = 8


def _inputs(rng, dims, lengths, batch=2, text_len=7):
  features = [rng.normal(size=(batch, n, d)).astype(np.float32) for n, d in zip(lengths, dims)]
  text = rng.normal(size=(batch, text_len, TEXT_DIM)).astype(np.float32)
  mask = np.zeros((batch, text_len), np.int32)
  mask[0, 1:4] = 1
  mask[1, 2:6] = 1
  return features, text, mask


def _numpy_cotr(params, names, features, text, mask, pool, score_norm="rms"):
  """Eq. 2–7, one example at a time, cross term as an explicit sum over j ≠ i.

  score_norm='none' is the equations as printed: scores of the raw projections."""
  linear = lambda x, p: x @ np.asarray(p["kernel"]) + np.asarray(p["bias"])

  def rms_norm(x, p):
    if score_norm == "none":
      assert p is None  # no normalisation parameters exist
      return x
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6) * np.asarray(p["scale"])

  def pooled(tokens, weights):
    total = (tokens * weights[:, None]).sum(0)
    return total / max(weights.sum(), 1.0) if pool == "mean" else total

  outputs = []
  for b in range(text.shape[0]):
    visual_hat = [rms_norm(linear(f[b], params[f"{n}_visual_proj"]),
                           params.get(f"{n}_visual_norm")) for n, f in zip(names, features)]
    text_hat = rms_norm(linear(text[b], params["text_proj"]), params.get("text_norm"))
    per_expert = []
    for i, name in enumerate(names):
      ones = np.ones(visual_hat[i].shape[0], np.float32)
      q_hat = rms_norm(linear(np.asarray(params[f"{name}_queries"]),
                              params[f"{name}_query_proj"]),
                       params.get(f"{name}_query_norm"))
      s_query = q_hat @ visual_hat[i].T
      s_self = pooled(visual_hat[i], ones) @ visual_hat[i].T
      s_cross = sum(pooled(visual_hat[j], np.ones(visual_hat[j].shape[0], np.float32))
                    @ visual_hat[i].T for j in range(len(names)) if j != i)
      s_text = pooled(text_hat, mask[b].astype(np.float32)) @ visual_hat[i].T
      scores = (s_query + s_self[None] + s_cross[None] + s_text[None]) / np.sqrt(COTR_DIM)
      scores = scores - scores.max(-1, keepdims=True)
      alpha = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
      per_expert.append(alpha @ features[i][b])
    outputs.append(np.concatenate(per_expert, -1))
  return np.stack(outputs)


def _run(num_visual_tokens, names, dims, lengths, pool="mean", seed=0, **cotr_kwargs):
  rng = np.random.default_rng(seed)
  features, text, mask = _inputs(rng, dims, lengths)
  module = cotr_lib.CoTR(cotr_lib.CoTRConfig(num_visual_tokens, COTR_DIM, pool,
                                             **cotr_kwargs), names)
  params = nn.unbox(module.init(jax.random.PRNGKey(seed), features, text, mask))["params"]
  # Random biases so every term of the equations is exercised.
  params = jax.tree.map(lambda p: p + 0.1 * rng.normal(size=p.shape).astype(np.float32),
                        params)
  apply = lambda f, t, m: module.apply({"params": params}, f, t, m)
  return apply, params, features, text, mask


@pytest.mark.parametrize("num_visual_tokens", [1, 16, 64, 256])
@pytest.mark.parametrize("names,dims,lengths", [
    (("clip", "convnext"), (6, 10), (9, 4)),
    (("clip", "convnext", "sam"), (6, 10, 5), (9, 4, 16)),
])
def test_matches_numpy_equations(num_visual_tokens, names, dims, lengths):
  apply, params, features, text, mask = _run(num_visual_tokens, names, dims, lengths)
  got = np.asarray(apply(features, text, mask))
  want = _numpy_cotr(params, names, features, text, mask, "mean")
  assert got.shape == (2, num_visual_tokens, sum(dims))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_sum_pool_matches_numpy():
  names, dims, lengths = ("a", "b"), (6, 10), (9, 4)
  apply, params, features, text, mask = _run(16, names, dims, lengths, pool="sum")
  want = _numpy_cotr(params, names, features, text, mask, "sum")
  np.testing.assert_allclose(np.asarray(apply(features, text, mask)), want, atol=1e-5,
                             rtol=1e-5)


def test_paper_literal_scores_match_the_raw_equations():
  """score_norm='none', query_init_std=0.02: Eq. 2–5 on the raw projections, no norm
  parameters, queries at std 0.02; the result differs from the default's."""
  names, dims, lengths = ("clip", "convnext", "sam"), (6, 10, 5), (9, 4, 16)
  init = cotr_lib.CoTR(cotr_lib.CoTRConfig(64, COTR_DIM, score_norm="none",
                                           query_init_std=0.02), names)
  features, text, mask = _inputs(np.random.default_rng(0), dims, lengths)
  fresh = nn.unbox(init.init(jax.random.PRNGKey(0), features, text, mask))["params"]
  assert not any("norm" in key for key in fresh)
  queries = np.concatenate([np.ravel(fresh[f"{n}_queries"]) for n in names])
  assert 0.015 < queries.std() < 0.025
  apply, params, features, text, mask = _run(16, names, dims, lengths, score_norm="none",
                                             query_init_std=0.02)
  want = _numpy_cotr(params, names, features, text, mask, "mean", score_norm="none")
  got = np.asarray(apply(features, text, mask))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  default, default_params, *_ = _run(16, names, dims, lengths)
  assert "clip_query_norm" in default_params
  assert np.abs(np.asarray(default(features, text, mask)) - got).max() > 1e-2
  with pytest.raises(ValueError, match="reducer.score_norm"):
    reducers.build_reducer(dict(kind="cotr", score_norm="layer"), names)


def test_rows_are_convex_combinations_of_expert_tokens():
  # With constant features every query must return that constant (softmax rows sum to 1).
  apply, _, features, text, mask = _run(4, ("a", "b"), (6, 10), (9, 4))
  constant = [np.full_like(f, 3.0) for f in features]
  np.testing.assert_allclose(np.asarray(apply(constant, text, mask)), 3.0, rtol=1e-5)


def test_tokens_outside_instruction_mask_do_not_matter():
  apply, _, features, text, mask = _run(16, ("a", "b"), (6, 10), (9, 4))
  base = np.asarray(apply(features, text, mask))
  changed = text.copy()
  changed[mask == 0] = 100.0 * np.random.default_rng(1).normal(size=changed[mask == 0].shape)
  np.testing.assert_allclose(np.asarray(apply(features, changed, mask)), base, atol=1e-6)
  # ... but instruction tokens do.
  changed = text.copy()
  changed[mask == 1] += 5.0
  assert np.abs(np.asarray(apply(features, changed, mask)) - base).max() > 1e-3


def test_padding_length_does_not_matter():
  apply, _, features, text, mask = _run(16, ("a", "b"), (6, 10), (9, 4))
  base = np.asarray(apply(features, text, mask))
  padded_text = np.concatenate([text, np.ones((2, 5, TEXT_DIM), np.float32)], axis=1)
  padded_mask = np.concatenate([mask, np.zeros((2, 5), np.int32)], axis=1)
  np.testing.assert_allclose(np.asarray(apply(features, padded_text, padded_mask)), base,
                             atol=1e-6)


def test_eagle_resize_matches_bilinear_reference():
  # 2x2 → 4x4 bilinear with corner-aligned samples (torch align_corners=True, as EAGLE).
  grid = np.array([[0.0, 1.0], [2.0, 3.0]], np.float32)
  tokens = grid.reshape(1, 4, 1)
  out = np.asarray(reducers.resize_tokens(jnp.asarray(tokens), (2, 2), 4)).reshape(4, 4)
  coords = np.arange(4) * (2 - 1) / (4 - 1)
  want = np.array([[(1 - y) * (1 - x) * 0 + (1 - y) * x * 1 + y * (1 - x) * 2 + y * x * 3
                    for x in coords] for y in coords])
  np.testing.assert_allclose(out, want, atol=1e-6)


@pytest.mark.parametrize("kind,tokens", [("none", 9), ("cotr", 5), ("mqt", 5)])
def test_reducers_share_one_interface(kind, tokens):
  rng = np.random.default_rng(0)
  features, text, mask = _inputs(rng, (6, 10), (16, 4))
  grids = ((4, 4), (2, 2))
  reducer = reducers.build_reducer(
      dict(kind=kind, num_visual_tokens=5, cotr_dim=8, grid_size=3, mqt_heads=2),
      ("a", "b"))
  variables = reducer.init(jax.random.PRNGKey(0), features, grids, text, mask)
  out = reducer.apply(variables, features, grids, text, mask)
  assert out.shape == (2, tokens, 16)
  assert np.all(np.isfinite(np.asarray(out)))


def test_bad_reducer_config_names_the_field():
  with pytest.raises(ValueError, match="reducer.kind"):
    reducers.build_reducer(dict(kind="pool"), ("a",))
  with pytest.raises(ValueError, match="unknown field"):
    reducers.build_reducer(dict(kind="cotr", tokens=4), ("a",))


def _row_spread(alpha):
  """Mean total-variation distance between the N^V rows of α [B, N^V, N]."""
  alpha = np.asarray(alpha, np.float64)
  tv = 0.5 * np.abs(alpha[:, :, None] - alpha[:, None, :]).sum(-1)
  count = alpha.shape[1] * (alpha.shape[1] - 1) * alpha.shape[0]
  return tv.sum() / count


def test_rows_of_alpha_differ_at_init_on_unnormalised_features():
  """Real expert features share a large common component and a large scale; at init the
  query term must still make the N^V reduced tokens differ (they were near-copies with
  std-0.02 queries: mean TV distance ~1e-7)."""
  rng = np.random.default_rng(0)
  dims, lengths = (32, 48), (16, 64)
  features = [(3.0 * (4.0 * rng.normal(size=(1, 1, d)) + rng.normal(size=(2, n, d))))
              .astype(np.float32) for n, d in zip(lengths, dims)]
  text = (5.0 * rng.normal(size=(2, 10, TEXT_DIM))).astype(np.float32)
  mask = np.ones((2, 10), np.int32)
  module = cotr_lib.CoTR(cotr_lib.CoTRConfig(8, 32), ("clip", "convnext"))
  params = module.init(jax.random.PRNGKey(0), features, text, mask)
  _, alphas = module.apply(params, features, text, mask, return_alpha=True)
  for alpha in alphas:
    np.testing.assert_allclose(np.asarray(alpha).sum(-1), 1.0, rtol=1e-5)
    assert _row_spread(alpha) > 0.1, _row_spread(alpha)


def test_masked_mean_divides_by_the_exact_count_under_bf16():
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.uniform(1, 2, size=(2, 301, 3)), jnp.bfloat16)
  mask = np.ones((2, 301), np.int32)
  mask[1, 257:] = 0
  want = np.stack([np.asarray(tokens[0], np.float64).mean(0),
                   np.asarray(tokens[1, :257], np.float64).mean(0)])
  got = cotr_lib.masked_pool(tokens, jnp.asarray(mask), "mean")
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)  # bf16 arithmetic: ~1e-2
  np.testing.assert_array_equal(np.asarray(cotr_lib.masked_pool(tokens, 0 * mask, "mean")),
                                0.0)


def _equations(jaxpr):
  """Every equation of a jaxpr, including those of nested jaxprs (pjit, custom_jvp)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      inner = getattr(param, "jaxpr", param)
      if hasattr(inner, "eqns"):
        yield from _equations(inner)


def test_scores_accumulate_in_float32_under_bf16():
  names, dims, lengths = ("a", "b"), (6, 10), (9, 4)
  rng = np.random.default_rng(3)
  features, text, mask = _inputs(rng, dims, lengths)
  config = cotr_lib.CoTRConfig(4, COTR_DIM)
  f32 = cotr_lib.CoTR(config, names)
  bf16 = cotr_lib.CoTR(config, names, dtype=jnp.bfloat16)
  params = f32.init(jax.random.PRNGKey(0), features, text, mask)
  jaxpr = jax.make_jaxpr(lambda p: bf16.apply(p, features, text, mask))(params)
  score_dots = [eqn for eqn in _equations(jaxpr.jaxpr) if eqn.primitive.name == "dot_general"
                and eqn.params.get("preferred_element_type") == jnp.float32]
  assert len(score_dots) == 2 * len(names)  # s_query and the shared terms per expert
  _, alpha_f32 = f32.apply(params, features, text, mask, return_alpha=True)
  _, alpha_bf16 = bf16.apply(params, features, text, mask, return_alpha=True)
  for a, b in zip(alpha_f32, alpha_bf16):
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-2)
