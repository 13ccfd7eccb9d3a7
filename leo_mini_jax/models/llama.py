"""LLaMA-family decoder (Llama-2 / Vicuna v1.5, Llama-3) with optional MMoE-LLM MLPs.

RMSNorm, rotary embeddings in HF's rotate-half layout (HF q/k weights need no
permutation), grouped-query attention through `jax.nn.dot_product_attention`, SwiGLU MLP,
layers under `nn.scan` with an `nn.remat` policy, and a KV cache driven by two pure
functions: `prefill` and `decode_step` (the cache's layout: `models/kv_cache.py`).

LM logits come out in float32 (the LM head's matmul accumulates and returns float32 via
`preferred_element_type`) whatever the compute dtype, so the cross-entropy over a large
vocabulary never sees bf16-rounded logits.

Sequences are right-padded: the real tokens of every row form a prefix. Causal masking
alone then keeps real tokens from seeing padding, so training and prefill need no padding
mask (and can use cuDNN flash attention); decoding masks the cache by each row's length.
Packed rows (several examples per row, `segment_ids`) keep attention within each example
(`models/attention.py`: splash's segment ids on TPU, a block-diagonal mask elsewhere,
which keeps 'auto' off cuDNN).
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from leo_mini_jax.models import attention as attention_lib
from leo_mini_jax.models import kv_cache
from leo_mini_jax.models import layers
from leo_mini_jax.models import mmoe as mmoe_lib
from leo_mini_jax.models import rotary
from leo_mini_jax.parallel import mesh as mesh_lib

Array = jax.Array
RopeScaling = rotary.RopeScaling

REMAT_POLICIES = {
    "none": None,  # no rematerialisation
    "full": "nothing_saveable",
    "dots": "checkpoint_dots",
    "dots_no_batch": "checkpoint_dots_with_no_batch_dims",
    "everything": "everything_saveable",
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shapes and numerics of a LLaMA-family decoder."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int | None = None  # None = num_heads (no GQA)
  head_dim: int | None = None  # None = hidden_size // num_heads
  rope_theta: float = 10000.0
  rope_scaling: rotary.RopeScaling | None = None
  rms_norm_eps: float = 1e-5
  tie_embeddings: bool = False
  max_position_embeddings: int = 4096
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: str | None = "auto"  # 'auto': cuDNN flash on GPU where valid, else XLA
  scan_layers: bool = True
  remat_policy: str = "none"
  mmoe: mmoe_lib.MMoEConfig = mmoe_lib.MMoEConfig()

  def __post_init__(self):
    if self.num_heads % self.kv_heads:
      raise ValueError(f"llm.num_heads={self.num_heads} must be a multiple of "
                       f"llm.num_kv_heads={self.kv_heads}")
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise ValueError(f"llm.hidden_size={self.hidden_size} is not divisible by "
                       f"llm.num_heads={self.num_heads}; set llm.head_dim")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"llm.remat_policy={self.remat_policy!r}: expected one of "
                       f"{sorted(REMAT_POLICIES)}")
    attention_lib.check_implementation(self.attention_impl, "llm.attention_impl")
    for name in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError:
        raise ValueError(f"llm.{name}={getattr(self, name)!r} is not a dtype") from None

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)


def rope_inverse_frequencies(config: LlamaConfig) -> Array:
  """inv_freq [head_dim // 2] of `config` (rotary.inverse_frequencies)."""
  return rotary.inverse_frequencies(config.dim_per_head, config.rope_theta,
                                    config.rope_scaling)


# ----------------------------------------------------------------------------- layers


def _kernel(names):
  return nn.with_logical_partitioning(nn.initializers.normal(0.02), names)


RMSNorm = layers.RMSNorm  # the towers' and the LLM's norm (HF LLaMA's arithmetic)


class Projection(nn.Module):
  """A bias-free linear map with a 2-D kernel [in, out] (HF's weight, transposed).

  `out_dtype` (e.g. float32 for the LM head) sets the matmul's accumulation and result
  dtype (`preferred_element_type`); None keeps the compute dtype.
  """
  features: int
  axes: tuple[str, str]
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  out_dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", _kernel(self.axes), (x.shape[-1], self.features),
                        self.param_dtype)
    kernel = mesh_lib.gathered(jnp.asarray(kernel, self.dtype), self.axes)
    return jnp.dot(x.astype(self.dtype), kernel, preferred_element_type=self.out_dtype)


class Attention(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x: Array, positions: Array, cache: dict | None, layer: Array | int,
               cache_lengths: Array | None, segment_ids: Array | None = None
               ) -> tuple[Array, dict | None]:
    """Causal GQA self-attention.

    Args:
      x: [B, T, D].
      positions: [B, T].
      segment_ids: [B, T] or None (training only): a token attends only to earlier
        tokens of its own segment (packed rows: block-diagonal causal).
      cache: None (training), or the whole cache {'k','v': [L, B, S, Hkv, Dh]}: this
        layer fills slots [0, T) of its entry (prefill, cache_lengths None) or appends
        the T new tokens of row b at slot cache_lengths[b] (decode, T = 1).
      layer: this layer's index into the cache's leading axis.
      cache_lengths: [B] tokens already in the cache (decode only).

    Returns:
      output [B, T, D] and the cache with this layer's entry updated (None in training).
    """
    cfg = self.config
    dt, pdt = cfg.compute_dtype, cfg.weight_dtype
    batch, length, _ = x.shape
    heads, kv_heads, head_dim = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
    proj = functools.partial(Projection, dtype=dt, param_dtype=pdt)
    q = proj(heads * head_dim, ("embed", "heads"), name="q_proj")(x)
    k = proj(kv_heads * head_dim, ("embed", "kv_heads"), name="k_proj")(x)
    v = proj(kv_heads * head_dim, ("embed", "kv_heads"), name="v_proj")(x)
    q = q.reshape(batch, length, heads, head_dim)
    k = k.reshape(batch, length, kv_heads, head_dim)
    v = v.reshape(batch, length, kv_heads, head_dim)
    q = nn.with_logical_constraint(
        q, ("activation_batch", "activation_length", "activation_heads", None))
    k = nn.with_logical_constraint(
        k, ("activation_batch", "activation_length", "activation_kv_heads", None))
    inv_freq = rope_inverse_frequencies(cfg)
    q = rotary.apply_rotary(q, positions, inv_freq)
    k = rotary.apply_rotary(k, positions, inv_freq)

    attend = functools.partial(attention_lib.dot_product_attention, impl=cfg.attention_impl)
    if cache is None:  # packed rows: splash takes segment ids, XLA a block-diagonal mask
      out, new_cache = attend(q, k, v, is_causal=True, segment_ids=segment_ids), None
    elif cache_lengths is None:  # prefill: attend causally, store the keys and values
      out = attend(q, k, v, is_causal=True)
      new_cache = kv_cache.write_prompt(cache, layer, k, v)
    else:  # decode: row b's new token goes to slot cache_lengths[b] (a scatter, in place)
      new_cache = kv_cache.append(cache, layer, cache_lengths, k, v)
      out = attend(q, new_cache["k"][layer].astype(dt), new_cache["v"][layer].astype(dt),
                   key_value_seq_lengths=cache_lengths + length)
    out = out.reshape(batch, length, heads * head_dim)
    out = proj(cfg.hidden_size, ("heads", "embed"), name="o_proj")(out)
    return out, new_cache


class MLP(nn.Module):
  """SwiGLU MLP; with MMoE-LLM each target projection adds its LoRA-expert delta."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x: Array, router_context: Array | None,
               token_mask: Array) -> tuple[Array, dict[str, Array]]:
    cfg = self.config
    dt, pdt = cfg.compute_dtype, cfg.weight_dtype
    mmoe_cfg = cfg.mmoe
    proj = functools.partial(Projection, dtype=dt, param_dtype=pdt)
    aux = {}
    weights = None
    if mmoe_cfg.enabled:
      weights, aux = mmoe_lib.MMoERouter(mmoe_cfg, dtype=dt, param_dtype=pdt,
                                         name="mmoe_router")(x, router_context, token_mask)

    def project(name, inputs, features, axes):
      y = proj(features, axes, name=name)(inputs)
      if mmoe_cfg.enabled and name in mmoe_cfg.targets:
        y = y + mmoe_lib.LoRAExperts(mmoe_cfg, features, axes[0], axes[1], dtype=dt,
                                     param_dtype=pdt, name=f"mmoe_{name}")(inputs, weights)
      return y

    gate = project("gate_proj", x, cfg.intermediate_size, ("embed", "mlp"))
    up = project("up_proj", x, cfg.intermediate_size, ("embed", "mlp"))
    hidden = nn.silu(gate) * up
    hidden = nn.with_logical_constraint(
        hidden, ("activation_batch", "activation_length", "activation_mlp"))
    return project("down_proj", hidden, cfg.hidden_size, ("mlp", "embed")), aux


class DecoderLayer(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, carry: tuple[Array, dict | None], positions: Array,
               router_context: Array | None, token_mask: Array, segment_ids: Array | None,
               cache_lengths: Array | None, layer: Array | int):
    """One pre-norm block. Signature fits nn.scan: (carry, broadcasts..., scanned).

    carry = (hidden [B, T, D], the whole KV cache or None); `layer` is the scanned
    layer index the block uses to address its cache entry.
    """
    cfg = self.config
    hidden, cache = carry
    norm = functools.partial(RMSNorm, eps=cfg.rms_norm_eps, dtype=cfg.compute_dtype,
                             param_dtype=cfg.weight_dtype)
    attn_out, new_cache = Attention(cfg, name="attention")(
        norm(name="input_norm")(hidden), positions, cache, layer, cache_lengths,
        segment_ids)
    hidden = hidden + attn_out
    mlp_out, aux = MLP(cfg, name="mlp")(norm(name="post_attention_norm")(hidden),
                                        router_context, token_mask)
    hidden = hidden + mlp_out
    hidden = nn.with_logical_constraint(
        hidden, ("activation_batch", "activation_length", "activation_embed"))
    return (hidden, new_cache), aux


class LlamaForCausalLM(nn.Module):
  """Decoder + embeddings + LM head.

  `apply({'params': p}, input_ids)` returns logits [B, T, vocab]. `forward` is the full
  interface used by LeoMini (input embeddings, router context, aux outputs); `prefill` and
  `decode_step` run the KV cache.
  """
  config: LlamaConfig

  def setup(self):
    cfg = self.config
    self.embed_tokens = nn.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype,
        param_dtype=cfg.weight_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                    ("vocab", "embed")))
    layer_cls = DecoderLayer
    policy_name = REMAT_POLICIES[cfg.remat_policy]
    if policy_name is not None:
      layer_cls = nn.remat(layer_cls, policy=getattr(jax.checkpoint_policies, policy_name),
                           prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      self.layers = nn.scan(
          layer_cls,
          variable_axes={"params": 0},
          split_rngs={"params": True, "dropout": True},  # a different mask per layer
          in_axes=(nn.broadcast,) * 5 + (0,),
          length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )(cfg)
    else:  # named layers_0, layers_1, ...
      self.layers = [layer_cls(cfg) for _ in range(cfg.num_layers)]
    self.final_norm = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.weight_dtype)
    if not cfg.tie_embeddings:
      self.lm_head = Projection(cfg.vocab_size, ("embed", "vocab"), cfg.compute_dtype,
                                cfg.weight_dtype, out_dtype=jnp.float32)

  def __call__(self, input_ids: Array) -> Array:
    logits, _ = self.forward(self.embed(input_ids))
    return logits

  def decoder(self, hidden, positions, router_context, token_mask, cache_lengths, cache,
              segment_ids=None):
    """Runs every layer; returns (hidden, new cache or None, aux stacked over layers).

    `cache` ({'k','v': [L, B, S, Hkv, Dh]} or None) is carried, not scanned over: each
    layer updates its own entry in place.
    """
    if self.config.scan_layers:
      layer_index = jnp.arange(self.config.num_layers, dtype=jnp.int32)
      (hidden, new_cache), aux = self.layers((hidden, cache), positions, router_context,
                                             token_mask, segment_ids, cache_lengths,
                                             layer_index)
      return hidden, new_cache, aux
    auxes = []
    for index, layer in enumerate(self.layers):
      (hidden, cache), aux = layer((hidden, cache), positions, router_context, token_mask,
                                   segment_ids, cache_lengths, index)
      auxes.append(aux)
    return hidden, cache, jax.tree.map(lambda *xs: jnp.stack(xs), *auxes)

  def embed(self, input_ids: Array) -> Array:
    """[B, T] ids → [B, T, D] input embeddings."""
    return self.embed_tokens(input_ids)

  def logits(self, hidden: Array) -> Array:
    """[..., D] → float32 logits [..., vocab] (accumulated in float32 under bf16 compute)."""
    hidden = self.final_norm(hidden)
    if self.config.tie_embeddings:
      embedding = jnp.asarray(self.embed_tokens.embedding, self.config.compute_dtype)
      logits = jnp.dot(hidden.astype(self.config.compute_dtype), embedding.T,
                       preferred_element_type=jnp.float32)
    else:
      logits = self.lm_head(hidden)
    return nn.with_logical_constraint(
        logits, ("activation_batch", "activation_length", "activation_vocab"))

  def forward(self, inputs_embeds: Array, positions: Array | None = None,
              token_mask: Array | None = None, router_context: Array | None = None,
              segment_ids: Array | None = None, return_hidden: bool = False):
    """Full-sequence forward.

    Args:
      inputs_embeds: [B, T, D].
      positions: [B, T]; default arange.
      token_mask: [B, T] non-padding tokens (for the MMoE balance loss); default all.
      router_context: [B, 2D] pooled visual + instruction embeddings, or [B, T, 2D] per
        token (MMoE only).
      segment_ids: [B, T] examples of packed rows (attention stays within one); None =
        one example per row.

    Returns:
      logits [B, T, vocab] — or, with return_hidden, the last layer's output [B, T, D]
      that `logits` turns into them — and aux: per-layer MMoE outputs (empty without
      MMoE).
    """
    hidden, positions, token_mask = self._prepare(inputs_embeds, positions, token_mask)
    hidden, _, aux = self.decoder(hidden, positions, router_context, token_mask, None, None,
                                  segment_ids)
    return (hidden if return_hidden else self.logits(hidden)), aux

  def _prepare(self, inputs_embeds, positions, token_mask):
    batch, length = inputs_embeds.shape[:2]
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    if token_mask is None:
      token_mask = jnp.ones((batch, length), jnp.int32)
    hidden = nn.with_logical_constraint(
        inputs_embeds.astype(self.config.compute_dtype),
        ("activation_batch", "activation_length", "activation_embed"))
    return hidden, positions, token_mask

  def prefill(self, inputs_embeds: Array, lengths: Array, cache_size: int,
              router_context: Array | None = None):
    """Runs the prompt and builds the cache.

    Args:
      inputs_embeds: [B, T, D] right-padded prompts.
      lengths: [B] real prompt lengths.
      cache_size: S >= T, slots per row.
      router_context: as in `forward`.

    Returns:
      logits at each row's last real token [B, vocab], the cache
      {'k','v': [layers, B, S, Hkv, Dh], 'lengths': [B]}, and the routing of every
      prompt token (`routing_of`: top_expert [layers, B, T]; empty without MMoE).
    """
    cfg = self.config
    batch, length = inputs_embeds.shape[:2]
    token_mask = (jnp.arange(length)[None, :] < lengths[:, None]).astype(jnp.int32)
    hidden, positions, token_mask = self._prepare(inputs_embeds, None, token_mask)
    empty = kv_cache.empty(cfg.num_layers, batch, cache_size, cfg.kv_heads,
                           cfg.dim_per_head, cfg.compute_dtype)
    hidden, cache, aux = self.decoder(hidden, positions, router_context, token_mask, None,
                                      empty)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)
    cache["lengths"] = lengths.astype(jnp.int32)
    return self.logits(last)[:, 0], cache, routing_of(aux)

  def decode_step(self, token_ids: Array, cache: dict, router_context: Array | None = None):
    """Feeds one token per row at position cache['lengths'].

    Returns logits [B, vocab], the cache with the token appended, and the token's
    routing (`routing_of`: top_expert [layers, B, 1]; empty without MMoE).
    """
    lengths = cache["lengths"]
    hidden = self.embed(token_ids[:, None])
    positions = lengths[:, None]
    token_mask = jnp.ones_like(positions)
    hidden, _, _ = self._prepare(hidden, positions, token_mask)
    layer_cache = {"k": cache["k"], "v": cache["v"]}
    hidden, new_cache, aux = self.decoder(hidden, positions, router_context, token_mask,
                                          lengths, layer_cache)
    new_cache["lengths"] = lengths + 1
    return self.logits(hidden)[:, 0], new_cache, routing_of(aux)


def routing_of(layer_aux: dict[str, Array]) -> dict[str, Array]:
  """The decoder's per-layer MMoE outputs without the balance loss (a training term):
  top_expert [layers, B, T] and expert_fraction [layers, E]; {} without MMoE."""
  return {k: v for k, v in layer_aux.items() if k != "balance_loss"}
