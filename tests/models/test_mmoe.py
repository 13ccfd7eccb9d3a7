"""MMoE-LLM: top-k exactness, Eq. 9 by hand, router and balance-loss gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from leo_mini_jax.config_utils import from_config
from leo_mini_jax.models import llama, mmoe

HIDDEN, MLP_DIM, EXPERTS, RANK = 16, 24, 3, 4


def _mlp(top_k=1, gate="straight_through", router_inputs="multimodal", lora_dropout=0.0):
  cfg = from_config(llama.LlamaConfig, dict(
      vocab_size=32, hidden_size=HIDDEN, intermediate_size=MLP_DIM, num_layers=1,
      num_heads=2, mmoe=dict(enabled=True, num_experts=EXPERTS, rank=RANK, alpha=8.0,
                             top_k=top_k, gate=gate, router_inputs=router_inputs,
                             router_hidden_dim=8, lora_dropout=lora_dropout)))
  module = llama.MLP(cfg)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, HIDDEN)).astype(np.float32)
  context = rng.normal(size=(2, 2 * HIDDEN)).astype(np.float32)
  mask = np.ones((2, 5), np.int32)
  params = nn.unbox(module.init(jax.random.PRNGKey(0), x, context, mask))["params"]
  # LoRA B starts at zero; give every expert a visible contribution.
  params = jax.tree.map(lambda p: p + 0.3 * rng.normal(size=p.shape).astype(np.float32),
                        params)
  apply = lambda p, x=x: module.apply({"params": p}, x, context, mask)
  return cfg, apply, params, x, context, mask


def _numpy_eq9(cfg, params, x, top_expert_onehot, probs, top_k, gate):
  """Eq. 9 for every target projection, written out per token."""
  scale = cfg.mmoe.alpha / cfg.mmoe.rank
  np_params = jax.tree.map(np.asarray, params)

  def project(name, inputs):
    out = inputs @ np_params[name]["kernel"]
    lora = np_params[f"mmoe_{name}"]
    out = out + scale * (inputs @ lora["general_a"] @ lora["general_b"])
    for e in range(EXPERTS):
      if gate == "straight_through":
        weight = top_expert_onehot[..., e] / top_k
      elif top_k == 1:  # p itself: p/p would be a constant 1
        weight = top_expert_onehot[..., e] * probs[..., e]
      else:
        chosen = top_expert_onehot * probs
        weight = chosen[..., e] / chosen.sum(-1)
      delta = inputs @ lora["experts_a"][e] @ lora["experts_b"][e]
      out = out + scale * weight[..., None] * delta
    return out

  gate_out = project("gate_proj", x)
  up = project("up_proj", x)
  hidden = gate_out / (1 + np.exp(-gate_out)) * up
  return project("down_proj", hidden)


def _router_probs(params, x, context, cfg):
  p = jax.tree.map(np.asarray, params["mmoe_router"])
  h = x @ p["hidden_proj"]["kernel"] + p["hidden_proj"]["bias"]
  if cfg.mmoe.router_inputs == "multimodal":
    h = h + (context @ p["context_proj"]["kernel"])[:, None]
  h = np.asarray(jax.nn.gelu(h, approximate=False))
  logits = h @ p["out_proj"]["kernel"] + p["out_proj"]["bias"]
  return np.asarray(jax.nn.softmax(logits, -1))


@pytest.mark.parametrize("top_k,gate", [(1, "straight_through"), (2, "straight_through"),
                                        (1, "prob"), (2, "prob")])
def test_output_equals_eq9_by_hand(top_k, gate):
  cfg, apply, params, x, context, _ = _mlp(top_k, gate)
  probs = _router_probs(params, x, context, cfg)
  top = np.argsort(-probs, -1)[..., :top_k]
  onehot = np.zeros_like(probs)
  np.put_along_axis(onehot, top, 1.0, -1)
  out, aux = apply(params)
  want = _numpy_eq9(cfg, params, x, onehot, probs, top_k, gate)
  np.testing.assert_allclose(np.asarray(out), want, atol=1e-4, rtol=1e-4)
  np.testing.assert_array_equal(np.asarray(aux["top_expert"]), probs.argmax(-1))


def test_top1_only_the_selected_expert_contributes():
  _, apply, params, x, context, _ = _mlp(top_k=1)
  out, aux = apply(params)
  top = np.asarray(aux["top_expert"])
  for expert in range(EXPERTS):
    perturbed = jax.tree.map(lambda p: p, params)
    for target in ("mmoe_gate_proj", "mmoe_up_proj", "mmoe_down_proj"):
      perturbed[target]["experts_b"] = params[target]["experts_b"].at[expert].add(1.0)
    out2, _ = apply(perturbed)
    changed = np.abs(np.asarray(out2) - np.asarray(out)).max(-1) > 1e-6
    np.testing.assert_array_equal(changed, top == expert)


@pytest.mark.parametrize("gate", ["straight_through", "prob"])
def test_router_and_balance_loss_gradients_are_nonzero(gate):
  """At k=1 as well: renormalised top-1 'prob' weights (p/p = 1) gave zero task gradient."""
  _, apply, params, *_ = _mlp(top_k=1, gate=gate)

  def task_loss(router_params):
    out, _ = apply({**params, "mmoe_router": router_params})
    return jnp.sum(out ** 2)

  def aux_loss(router_params):
    return apply({**params, "mmoe_router": router_params})[1]["balance_loss"]

  for loss in (task_loss, aux_loss):
    grads = jax.grad(loss)(params["mmoe_router"])
    norms = {k: float(jnp.linalg.norm(v["kernel"])) for k, v in grads.items()}
    assert all(n > 1e-4 for n in norms.values()), (loss.__name__, norms)


def test_prob_gate_at_k1_weights_the_selected_expert_by_p():
  probs = jnp.array([[0.5, 0.3, 0.2], [0.1, 0.7, 0.2]])
  weights, _ = mmoe.routing_weights(probs, 1, "prob")
  np.testing.assert_allclose(np.asarray(weights), [[0.5, 0, 0], [0, 0.7, 0]], atol=1e-7)
  grad = jax.grad(lambda p: mmoe.routing_weights(p, 1, "prob")[0].sum())(probs)
  np.testing.assert_allclose(np.asarray(grad), [[1, 0, 0], [0, 1, 0]], atol=1e-7)


def test_router_logits_accumulate_in_float32_under_bf16():
  cfg = mmoe.MMoEConfig(enabled=True, num_experts=EXPERTS, router_hidden_dim=8)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 5, HIDDEN)), jnp.bfloat16)
  context = jnp.asarray(rng.normal(size=(2, 2 * HIDDEN)), jnp.bfloat16)
  mask = jnp.ones((2, 5))
  router = mmoe.MMoERouter(cfg, dtype=jnp.bfloat16)
  params = router.init(jax.random.PRNGKey(0), x, context, mask)
  jaxpr = jax.make_jaxpr(lambda p: router.apply(p, x, context, mask))(params)
  dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
  out_dot = [e for e in dots if e.outvars[0].aval.shape[-1] == EXPERTS]
  assert len(out_dot) == 1
  assert out_dot[0].params["preferred_element_type"] == jnp.float32
  assert out_dot[0].outvars[0].aval.dtype == jnp.float32
  weights, aux = router.apply(params, x, context, mask)
  f32_weights, _ = mmoe.MMoERouter(cfg).apply(params, x.astype(jnp.float32),
                                             context.astype(jnp.float32), mask)
  np.testing.assert_allclose(np.asarray(weights, np.float32), np.asarray(f32_weights),
                             atol=0.1)


def test_hidden_only_router_has_no_context_weights():
  _, apply, params, x, context, mask = _mlp(router_inputs="hidden")
  assert "context_proj" not in params["mmoe_router"]
  out1, _ = apply(params)
  assert out1.shape == x.shape


def test_balance_loss_is_smallest_for_uniform_routing():
  mask = jnp.ones((1, 6))
  uniform = jnp.full((1, 6, 3), 1 / 3)
  uniform_selected = jax.nn.one_hot(jnp.array([[0, 1, 2, 0, 1, 2]]), 3)
  skewed = jnp.tile(jnp.array([0.6, 0.3, 0.1]), (1, 6, 1))
  skewed_selected = jax.nn.one_hot(jnp.zeros((1, 6), int), 3)
  uniform_loss, fraction = mmoe.balance_loss(uniform, uniform_selected, mask)
  skewed_loss, _ = mmoe.balance_loss(skewed, skewed_selected, mask)
  np.testing.assert_allclose(float(uniform_loss), 1.0, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(fraction), [1 / 3] * 3, rtol=1e-6)
  np.testing.assert_allclose(float(skewed_loss), 3 * 0.6, rtol=1e-6)
  assert uniform_loss < skewed_loss


def test_balance_loss_ignores_padding_tokens():
  probs = jnp.array([[[0.5, 0.5], [1.0, 0.0]]])
  selected = jnp.array([[[1.0, 0.0], [1.0, 0.0]]])
  loss, _ = mmoe.balance_loss(probs, selected, jnp.array([[1, 0]]))
  np.testing.assert_allclose(float(loss), 2 * 1.0 * 0.5, rtol=1e-6)


def test_straight_through_forward_values_are_one_over_k():
  probs = jnp.array([[0.5, 0.3, 0.2]])
  weights, selected = mmoe.routing_weights(probs, 2, "straight_through")
  np.testing.assert_allclose(np.asarray(weights), [[0.5, 0.5, 0.0]], atol=1e-7)
  grad = jax.grad(lambda p: mmoe.routing_weights(p, 2, "straight_through")[0][0, 0])(probs)
  np.testing.assert_allclose(np.asarray(grad), [[1.0, 0.0, 0.0]])


def test_disabled_mmoe_adds_no_parameters():
  cfg = from_config(llama.LlamaConfig, dict(vocab_size=32, hidden_size=16,
                                            intermediate_size=24, num_layers=1, num_heads=2))
  x = jnp.ones((1, 3, 16))
  params = llama.MLP(cfg).init(jax.random.PRNGKey(0), x, None, jnp.ones((1, 3)))["params"]
  assert set(params) == {"gate_proj", "up_proj", "down_proj"}


def test_bad_mmoe_config_names_the_field():
  with pytest.raises(ValueError, match="mmoe.top_k"):
    mmoe.MMoEConfig(enabled=True, num_experts=3, top_k=4)
  with pytest.raises(ValueError, match="mmoe.targets"):
    mmoe.MMoEConfig(targets=("q_proj",))


def test_lora_dropout_acts_only_with_a_dropout_rng():
  cfg, apply, params, x, context, mask = _mlp(lora_dropout=0.5)
  module = llama.MLP(cfg)
  run = lambda rngs=None: np.asarray(
      module.apply({"params": params}, x, context, mask, rngs=rngs)[0])
  # Evaluation and generation pass no dropout RNG: the output is Eq. 9 exactly.
  probs = _router_probs(params, x, context, cfg)
  onehot = jax.nn.one_hot(np.argmax(probs, -1), EXPERTS)
  want = _numpy_eq9(cfg, params, x, np.asarray(onehot), probs, 1, "straight_through")
  np.testing.assert_allclose(run(), want, rtol=1e-4, atol=1e-4)
  # Training passes one: the LoRA inputs are dropped, the frozen projection is not.
  key = jax.random.PRNGKey(3)
  dropped = run({"dropout": key})
  assert not np.allclose(dropped, want, atol=1e-3)
  np.testing.assert_array_equal(dropped, run({"dropout": key}))  # same key, same masks
  assert not np.allclose(dropped, run({"dropout": jax.random.PRNGKey(4)}))
  # With the LoRA deltas zeroed (fresh B), dropout changes nothing: only LoRA inputs drop.
  zero_b = jax.tree_util.tree_map_with_path(
      lambda path, p: p * 0 if str(path[-1].key).endswith("_b") else p, params)
  np.testing.assert_allclose(
      np.asarray(module.apply({"params": zero_b}, x, context, mask, rngs={"dropout": key})[0]),
      np.asarray(module.apply({"params": zero_b}, x, context, mask)[0]), rtol=1e-6)


def test_lora_dropout_rate_is_checked():
  with pytest.raises(ValueError, match="lora_dropout"):
    mmoe.MMoEConfig(enabled=True, lora_dropout=1.0)
