"""Prefill FLOPs: XLA's count on an unrolled model, and the analytic LLM formula.

`compiled.cost_analysis()` counts a scanned layer body once, so the XLA count is taken on a
copy of the model whose LLM layers are unrolled (same parameters and arithmetic).
"""

import dataclasses
import flax.linen as nn
import jax
import numpy as np

from leo_mini_jax.models import leo_mini as leo_mini_lib
from leo_mini_jax.models import llama as llama_lib


def xla_prefill_flops(config: leo_mini_lib.LeoMiniConfig, text_length: int,
                      resolution: int) -> float:
  """FLOPs of one example's prefill (vision experts, reducer, projector, LLM).

  Counted by XLA on abstract inputs: nothing is allocated.
  """
  unrolled = dataclasses.replace(config, llm=dataclasses.replace(config.llm,
                                                                 scan_layers=False))
  model = leo_mini_lib.LeoMini(unrolled)
  ids = np.zeros((1, text_length), np.int32)
  ids[0, 1] = leo_mini_lib.IMAGE_PLACEHOLDER_ID
  batch = {
      "input_ids": ids, "attention_mask": np.ones((1, text_length), np.int32),
      "instruction_mask": np.ones((1, text_length), np.int32),
      "image": np.zeros((1, resolution, resolution, 3), np.uint8),
      "has_image": np.ones((1,), bool),
  }
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), batch))["params"]
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn.unbox(abstract))
  cache_size = model.sequence_length(text_length)
  prefill = lambda params, b: model.apply({"params": params}, b, cache_size,
                                          method=model.prefill)
  compiled = jax.jit(prefill).lower(abstract, batch).compile()
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis["flops"])


def llm_prefill_flops(config: llama_lib.LlamaConfig, sequence_length: int) -> float:
  """Analytic forward FLOPs (2 per multiply-add) of the LLM on one sequence.

  Linear layers plus attention scores and values over the full (unmasked) square, as
  profilers count dense attention; MMoE-LLM's low-rank terms are included when enabled.
  """
  t, d = sequence_length, config.hidden_size
  q_dim = config.num_heads * config.dim_per_head
  kv_dim = config.kv_heads * config.dim_per_head
  linear = d * q_dim * 2 + d * kv_dim * 2 + 3 * d * config.intermediate_size
  attention = 2 * t * q_dim  # QKᵀ and AV per query token
  mmoe = 0
  if config.mmoe.enabled:
    m = config.mmoe
    sizes = {"gate_proj": (d, config.intermediate_size), "up_proj": (d, config.intermediate_size),
             "down_proj": (config.intermediate_size, d)}
    # The batched bank computes all E experts plus the general one (DESIGN.md §2.3 d).
    mmoe = sum((i + o) * m.rank * (1 + m.num_experts) for name, (i, o) in sizes.items()
               if name in m.targets)
    mmoe += d * m.router_hidden_dim + m.router_hidden_dim * m.num_experts
  per_layer = 2 * t * (linear + attention + mmoe)
  return float(config.num_layers * per_layer + 2 * t * d * config.vocab_size)
