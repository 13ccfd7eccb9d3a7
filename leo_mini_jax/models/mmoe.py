"""MMoE-LLM: a mixture of LoRA experts with a multimodal router (paper §3.3, Eq. 8–9).

Each LLM block's MLP gets, on every projection named in `targets`:

    y = f_ORI(x) + f_GEN(x) + Σ_{i ∈ TopK(R)} f_i(x) / k                    (Eq. 9)

with f_GEN an always-on LoRA expert, f_i the E routed LoRA experts and
R = softmax(router([x ; pool(Ĩ) ; pool(T)])) one routing decision per token per block,
shared by every target projection of that block (docs/design.md §2.3 a).

Forward values are exactly Eq. 8 (weight 1/k on the selected experts). A hard top-k with
constant weights gives the router no gradient, so the weights carry a straight-through
term, 1/k + p − stop_gradient(p), whose value is 1/k and whose gradient is that of p
(docs/design.md §2.3 b). `gate='prob'` uses renormalised top-k probabilities instead; at
k=1 the renormalised weight p/p is the constant 1 (no router gradient at all), so k=1
uses the selected probability p itself as the weight (Switch Transformer's choice).

The router's logits accumulate in float32 (`preferred_element_type`) and its softmax
runs in float32 under bf16 compute.

The expert bank is one batched low-rank product with a per-token weight mask: with r=16
it costs under 1% of the MLP and needs no gather/scatter (docs/design.md §2.3 d).
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from leo_mini_jax.models import layers

GATES = ("straight_through", "prob")
BALANCE_REDUCES = ("mean", "sum")
ROUTER_INPUTS = ("multimodal", "hidden")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class MMoEConfig:
  """MMoE-LLM settings; `enabled=False` adds no parameters (stages 1–2)."""
  enabled: bool = False
  num_experts: int = 3
  rank: int = 16
  alpha: float = 32.0
  targets: tuple[str, ...] = MLP_TARGETS
  top_k: int = 1
  gate: str = "straight_through"
  router_inputs: str = "multimodal"
  router_hidden_dim: int = 128
  balance_coef: float = 0.05  # λ
  # How the per-layer balance losses combine before × λ: 'mean' over layers (this
  # project's default) or 'sum' (Switch/GShard add one term per MoE layer: L× stronger).
  balance_reduce: str = "mean"
  # Dropout on each LoRA bank's input, as PEFT's LoraConfig(lora_dropout=...) in
  # LLaVA-1.5's LoRA recipe (0.05). Active only when the caller passes a 'dropout' RNG:
  # the train step does; evaluation, scoring and generation do not.
  lora_dropout: float = 0.0

  def __post_init__(self):
    if not 0.0 <= self.lora_dropout < 1.0:
      raise ValueError(f"mmoe.lora_dropout={self.lora_dropout}: expected a rate in [0, 1)")
    if self.balance_reduce not in BALANCE_REDUCES:
      raise ValueError(f"mmoe.balance_reduce={self.balance_reduce!r}: expected one of "
                       f"{BALANCE_REDUCES}")
    if self.gate not in GATES:
      raise ValueError(f"mmoe.gate={self.gate!r}: expected one of {GATES}")
    if self.router_inputs not in ROUTER_INPUTS:
      raise ValueError(
          f"mmoe.router_inputs={self.router_inputs!r}: expected one of {ROUTER_INPUTS}")
    if not 1 <= self.top_k <= self.num_experts:
      raise ValueError(
          f"mmoe.top_k={self.top_k} must be in [1, mmoe.num_experts={self.num_experts}]")
    bad = sorted(set(self.targets) - set(MLP_TARGETS))
    if bad:
      raise ValueError(f"mmoe.targets: unknown projection(s) {bad}; expected {MLP_TARGETS}")
    if self.rank < 1:
      raise ValueError(f"mmoe.rank={self.rank} must be >= 1")


def routing_weights(probs: jax.Array, top_k: int, gate: str) -> tuple[jax.Array, jax.Array]:
  """Per-expert mixing weights from router probabilities.

  Args:
    probs: [..., E] router probabilities (float32).
    top_k: experts selected per token.
    gate: 'straight_through' (Eq. 8 values, 1/k, with the gradient of p) or 'prob'
      (renormalised top-k probabilities; p itself at k=1, where p/p would be constant).

  Returns:
    weights [..., E] (zero outside the top-k) and the selection mask [..., E].
  """
  _, top_index = jax.lax.top_k(probs, top_k)
  selected = jax.nn.one_hot(top_index, probs.shape[-1], dtype=probs.dtype).sum(-2)
  if gate == "straight_through":
    weights = selected * (1.0 / top_k + probs - jax.lax.stop_gradient(probs))
  elif top_k == 1:
    weights = selected * probs
  else:
    chosen = selected * probs
    weights = chosen / jnp.sum(chosen, axis=-1, keepdims=True)
  return weights, selected


def balance_loss(probs: jax.Array, selected: jax.Array, token_mask: jax.Array) -> tuple[
    jax.Array, jax.Array]:
  """Switch-style differentiable balance loss E · Σ_i f_i · P_i over non-padding tokens.

  f_i (fraction of routed slots that went to expert i) comes from the hard selection and
  carries no gradient; P_i (mean router probability) carries it. Uniform routing gives 1,
  full collapse onto one expert gives E.

  Args:
    probs: [B, T, E] router probabilities.
    selected: [B, T, E] top-k selection mask (k ones per token).
    token_mask: [B, T] 1 on tokens that count.

  Returns:
    (loss scalar, f [E]).
  """
  num_experts = probs.shape[-1]
  mask = token_mask.astype(probs.dtype)[..., None]
  num_tokens = jnp.maximum(jnp.sum(mask), 1.0)
  slots = jnp.maximum(jnp.sum(selected * mask), 1.0)
  fraction = jnp.sum(selected * mask, axis=(0, 1)) / slots
  mean_prob = jnp.sum(probs * mask, axis=(0, 1)) / num_tokens
  return num_experts * jnp.sum(fraction * mean_prob), fraction


class MMoERouter(nn.Module):
  """2-layer GELU router over [x ; pooled visual tokens ; pooled instruction tokens].

  The context half of the first layer is the same for every token of an example, so it is
  applied once per example and broadcast: mathematically the first layer of an MLP over
  the concatenation, at the cost of an MLP over x.
  """
  config: MMoEConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, router_context: jax.Array | None,
               token_mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Routes tokens.

    Args:
      x: [B, T, D] block input hidden states (the MLP's input).
      router_context: [B, 2D] pooled visual and instruction embeddings, or [B, T, 2D]
        per token (packed rows) (ignored when router_inputs='hidden').
      token_mask: [B, T] non-padding tokens, for the balance loss.

    Returns:
      weights [B, T, E] for the routed experts and aux: balance_loss, expert_fraction [E],
      top_expert [B, T] (int32, the first choice).
    """
    cfg = self.config
    dense = lambda features, names, name, use_bias=True: layers.dense(
        features, names, name, self.dtype, self.param_dtype, use_bias)
    hidden = dense(cfg.router_hidden_dim, ("embed", "router_hidden"), "hidden_proj")(x)
    if cfg.router_inputs == "multimodal":
      if router_context is None:
        raise ValueError("MMoE router_inputs='multimodal' needs router_context "
                         "(pooled visual and instruction tokens)")
      context = dense(cfg.router_hidden_dim, ("router_context", "router_hidden"),
                      "context_proj", use_bias=False)(router_context)
      # One context per row ([B, 2D]: one example) or per token ([B, T, 2D]: packed
      # rows, each token its own example's).
      hidden = hidden + (context[:, None, :] if context.ndim == 2 else context)
    hidden = nn.gelu(hidden, approximate=False)
    axes = ("router_hidden", "router_experts")
    logits = nn.Dense(  # float32 accumulation and output under bf16 compute
        cfg.num_experts, dtype=self.dtype, param_dtype=self.param_dtype, name="out_proj",
        dot_general=functools.partial(jax.lax.dot_general,
                                      preferred_element_type=jnp.float32),
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]))(hidden)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, selected = routing_weights(probs, cfg.top_k, cfg.gate)
    loss, fraction = balance_loss(probs, selected, token_mask)
    aux = {
        "balance_loss": loss,
        "expert_fraction": fraction,
        "top_expert": jnp.argmax(probs, axis=-1).astype(jnp.int32),
    }
    return weights, aux


class LoRAExperts(nn.Module):
  """The LoRA deltas of one projection: E routed experts plus the general expert.

  delta = (alpha / r) · [ x̃ A_gen B_gen + Σ_i w_i · x̃ A_i B_i ]
  B starts at zero, so a fresh bank leaves the frozen layer's output unchanged. x̃ is x
  with `lora_dropout` applied when a 'dropout' RNG is given (one mask per projection,
  shared by its experts, as PEFT drops the input of each adapted layer), else x.
  """
  config: MMoEConfig
  features: int
  in_axis: str
  out_axis: str
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, weights: jax.Array) -> jax.Array:
    """x: [B, T, D_in]; weights: [B, T, E] → delta [B, T, features]."""
    cfg = self.config
    in_features = x.shape[-1]
    # PyTorch LoRA's kaiming_uniform(a=√5) on A is U(±1/√fan_in).
    bound = 1.0 / (in_features ** 0.5)
    uniform = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
    param = lambda name, init, shape, names: self.param(
        name, nn.with_logical_partitioning(init, names), shape, self.param_dtype)
    zeros = nn.initializers.zeros
    general_a = param("general_a", uniform, (in_features, cfg.rank),
                      (self.in_axis, "lora_rank"))
    general_b = param("general_b", zeros, (cfg.rank, self.features),
                      ("lora_rank", self.out_axis))
    experts_a = param("experts_a", uniform, (cfg.num_experts, in_features, cfg.rank),
                      ("lora_experts", self.in_axis, "lora_rank"))
    experts_b = param("experts_b", zeros, (cfg.num_experts, cfg.rank, self.features),
                      ("lora_experts", "lora_rank", self.out_axis))
    x = x.astype(self.dtype)
    if cfg.lora_dropout > 0.0 and self.has_rng("dropout"):
      x = nn.Dropout(cfg.lora_dropout, deterministic=False)(x)
    cast = lambda p: jnp.asarray(p, self.dtype)
    general = (x @ cast(general_a)) @ cast(general_b)
    low_rank = jnp.einsum("btd,edr->bter", x, cast(experts_a))
    low_rank = low_rank * weights.astype(self.dtype)[..., None]
    routed = jnp.einsum("bter,ero->bto", low_rank, cast(experts_b))
    return (general + routed) * (cfg.alpha / cfg.rank)
