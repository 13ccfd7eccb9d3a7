"""Prefill cost of a LEO-MINI config (paper Table 4): FLOPs per component, parameter and
KV-cache bytes from abstract shapes, and measured latency and peak memory on a device.

`prefill_costs` traces one example's prefill (vision experts → reducer → projector → LLM
prefill with its KV cache) on ShapeDtypeStructs and counts its FLOPs from the jaxpr
(flops.py: every scanned layer counted, dot_general and conv_general_dilated exactly),
attributed per component: `vision/<expert>` for each expert the config builds, `reducer`,
`projector`, `llm` and `other`. Nothing is allocated, so it runs for an 8B config on a
laptop. `measure_prefill` runs the same program with random weights where they fit.

`xla_prefill_flops` (XLA's count with the LLM unrolled) and `llm_prefill_flops` (analytic)
are cross-checks.
"""

import dataclasses
import math
import os
import re
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from leo_mini_jax.data import conversation as conversation_lib
from leo_mini_jax.data import tokenizers as tokenizers_lib
from leo_mini_jax.evaluation import flops as flops_lib
from leo_mini_jax.models import factory
from leo_mini_jax.models import leo_mini as leo_mini_lib
from leo_mini_jax.models import llama as llama_lib

TABLE4_QUESTION = "What is shown in this image?"  # the paper's efficiency prompt (§4.6)


@dataclasses.dataclass(frozen=True)
class PrefillProgram:
  """One example's prefill as a pure function of (params, batch), on abstract inputs."""
  model: leo_mini_lib.LeoMini
  abstract_params: Any  # ShapeDtypeStructs
  batch: dict[str, np.ndarray]
  cache_size: int

  def fn(self, params, batch):
    """(logits, cache): the prefill without its routing outputs (not a cost of serving)."""
    logits, cache, _ = self.model.apply({"params": params}, batch, self.cache_size,
                                        method=self.model.prefill)
    return logits, cache


def prefill_program(config: leo_mini_lib.LeoMiniConfig, text_length: int,
                    resolution: int) -> PrefillProgram:
  """The prefill of one image + `text_length` text tokens (the placeholder counts as one)."""
  model = leo_mini_lib.LeoMini(config)
  ids = np.zeros((1, text_length), np.int32)
  ids[0, min(1, text_length - 1)] = leo_mini_lib.IMAGE_PLACEHOLDER_ID
  batch = {
      "input_ids": ids, "attention_mask": np.ones((1, text_length), np.int32),
      "instruction_mask": np.ones((1, text_length), np.int32),
      "image": np.zeros((1, resolution, resolution, 3), np.uint8),
      "has_image": np.ones((1,), bool),
  }
  abstract = factory.init_shapes(model, batch, boxed=False)
  return PrefillProgram(model, abstract, batch, model.sequence_length(text_length))


def tree_bytes(tree) -> int:
  return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree)))


def prefill_costs(config: leo_mini_lib.LeoMiniConfig, text_length: int,
                  resolution: int) -> dict[str, Any]:
  """Shape-only costs of one example's prefill; nothing is allocated.

  Returns a dict: visual_tokens, text_tokens, sequence_length, prefill_flops (dot + conv,
  every layer), flops (the same per component), vision_flops (all experts together),
  elementwise_flops, transcendentals, while_loops_counted_once, param_count, param_bytes
  (in the config's parameter dtypes), param_bytes_by_component, kv_cache_bytes (the
  prefill's cache, sized to the prompt).
  """
  program = prefill_program(config, text_length, resolution)
  count = flops_lib.count_flops(program.fn, program.abstract_params, program.batch)
  _, cache = jax.eval_shape(program.fn, program.abstract_params, program.batch)
  by_component = {}
  for key, sub in program.abstract_params.items():
    if key == "vision":
      by_component.update({f"vision/{name}": tree_bytes(t) for name, t in sub.items()})
    else:
      by_component[key] = tree_bytes(sub)
  return {
      "visual_tokens": config.num_visual_tokens,
      "text_tokens": text_length,
      "sequence_length": program.cache_size,
      "prefill_flops": count.total_matmul,
      "flops": count.by_component(),
      "vision_flops": sum(v for k, v in count.by_component().items()
                          if k.startswith("vision/")),
      "elementwise_flops": count.total_elementwise,
      "transcendentals": count.transcendentals,
      "while_loops_counted_once": count.while_loops,
      "param_count": int(sum(math.prod(x.shape)
                             for x in jax.tree.leaves(program.abstract_params))),
      "param_bytes": tree_bytes(program.abstract_params),
      "param_bytes_by_component": by_component,
      "kv_cache_bytes": tree_bytes({k: cache[k] for k in ("k", "v")}),
  }


# ----------------------------------------------------------------------------- the prompt


class EstimatedTokenizer(tokenizers_lib.Tokenizer):
  """Counts tokens when no tokenizer is configured: a stated assumption, not a vocabulary.

  Text is split with Llama-3's pre-tokenizer pattern (tiktoken style: a word with its
  leading space, up to 3 digits, a punctuation run, a newline run, whitespace) and each
  piece counted as one token — how Llama-3's 128K vocabulary encodes common English
  words; rare or long words would take more. Special tokens count one each.
  """
  _PIECES = re.compile(r"'(?:s|t|re|ve|m|ll|d)|[^\r\n\w]?[^\W\d_]+|\d{1,3}"
                       r"| ?[^\s\w]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+", re.IGNORECASE)
  ASSUMPTION = ("no tokenizer configured: token count estimated, one token per piece of "
                "Llama-3's pre-tokenizer split (word with its leading space, punctuation, "
                "newline run) and per special token")

  def __init__(self):
    self.bos_id, self.eos_id, self.pad_id, self.vocab_size = 1, 2, 0, 3

  def __repr__(self):
    return "EstimatedTokenizer()"

  def encode(self, text: str) -> list[int]:
    return [0] * len(self._PIECES.findall(text))

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    raise NotImplementedError("EstimatedTokenizer only counts tokens")

  def token_id(self, token: str) -> int | None:
    return 1


def table4_prompt(data_cfg, question: str = TABLE4_QUESTION) -> dict[str, Any]:
  """One image + `question` through the config's template: its token count and source.

  The tokenizer is the config's `data.tokenizer`; when none is configured ('') the count
  is an `EstimatedTokenizer` estimate and `tokenizer` says so.
  """
  name = data_cfg.get("tokenizer") or ""
  if name:
    tokenizer, source = tokenizers_lib.load_tokenizer(name), f"data.tokenizer={name}"
  else:
    tokenizer, source = EstimatedTokenizer(), EstimatedTokenizer.ASSUMPTION
  template = conversation_lib.get_template(
      data_cfg.template if data_cfg.template != "auto" else tokenizers_lib.template_for(
          tokenizer), data_cfg.get("system_prompt"))
  turns = [{"from": "human", "value": f"{conversation_lib.IMAGE_MARKER}\n{question}"}]
  tokens = conversation_lib.tokenize_prompt(turns, tokenizer, template, has_image=True)
  return {"question": question, "template": template.name, "tokenizer": source,
          "text_tokens": len(tokens)}


# ----------------------------------------------------------------------------- measurement


def device_memory_limit(device=None) -> tuple[int | None, str]:
  """(bytes usable on `device`, where the number comes from)."""
  device = device or jax.local_devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), "device bytes_limit"
  try:  # CPU: the host's available memory
    return (os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"),
            "available host memory")
  except (ValueError, OSError, AttributeError):
    return None, "unknown"


def _inference_params(abstract_params, dtype):
  if dtype is None:
    return abstract_params
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype), abstract_params)


def random_params(abstract_params, seed: int = 0):
  """Random weights of the given shapes, made on device: normal(0.02) kernels and
  embeddings, 0 for biases, 1 for the other vectors (norm and layer scales).

  One normal draw the size of the largest leaf is cut into every kernel at a different
  offset: XLA:CPU compiles one random op per second or so, and a model has hundreds of
  leaves (and `model.init` under jit also traces the forward pass). The buffer is at
  most the largest leaf, so the device's memory peak stays the prefill's.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_params)
  largest = max([math.prod(leaf.shape) for _, leaf in leaves if leaf.ndim >= 2] or [1])
  key = jax.random.key(seed, impl="unsafe_rbg")
  pool = jax.jit(lambda k: 0.02 * jax.random.normal(k, (largest,)))(key)

  def make(pool):
    out = []
    for index, (path, leaf) in enumerate(leaves):
      if leaf.ndim >= 2:
        size = math.prod(leaf.shape)
        start = (index * 7919) % (largest - size + 1)
        out.append(pool[start:start + size].reshape(leaf.shape).astype(leaf.dtype))
      else:
        fill = 0 if "bias" in jax.tree_util.keystr(path) else 1
        out.append(jnp.full(leaf.shape, fill, leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)

  params = jax.jit(make)(pool)
  del pool
  return params


def measure_prefill(config: leo_mini_lib.LeoMiniConfig, text_length: int, resolution: int,
                    repeats: int = 5, param_dtype: str | None = None, force: bool = False,
                    seed: int = 0) -> dict[str, Any]:
  """Prefill latency and peak memory of one example with random weights, on device 0.

  Weights are `random_params` in `param_dtype` (None keeps the config's parameter
  dtypes). Skipped, with a note, when XLA's memory estimate of the program exceeds 90% of
  the device's memory (unless `force`).

  Returns latency_s (median of `repeats` blocked runs after a warm-up run), compile_s,
  first_run_s, xla_memory_bytes (XLA's buffer assignment for the prefill: weights, inputs, outputs
  and temporaries), peak_bytes_in_use (the device's own counter, process-wide, where it
  has one), or {'measured': False, 'note': why}.
  """
  program = prefill_program(config, text_length, resolution)
  dtype = jnp.dtype(param_dtype) if param_dtype else None
  abstract = _inference_params(program.abstract_params, dtype)
  limit, limit_source = device_memory_limit()
  device = jax.local_devices()[0]

  def skipped(needed, what, xla_bytes=None):
    return {"measured": False, "xla_memory_bytes": xla_bytes,
            "note": (f"skipped: {what} need ~{needed / 2**30:.1f} GiB, {device.device_kind} "
                     f"has {limit / 2**30:.1f} GiB ({limit_source})")}

  if not force and limit is not None and tree_bytes(abstract) > 0.9 * limit:
    return skipped(tree_bytes(abstract), "the weights alone")  # no need to compile
  start = time.perf_counter()
  compiled = jax.jit(program.fn).lower(abstract, program.batch).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  xla_bytes = None
  if memory is not None:
    xla_bytes = int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                    + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  needed = xla_bytes or tree_bytes(abstract)
  if not force and limit is not None and needed > 0.9 * limit:
    return skipped(needed, "weights, activations and cache (XLA's estimate)", xla_bytes)

  params = random_params(abstract, seed)
  rng = np.random.default_rng(seed)
  batch = dict(program.batch)
  ids = rng.integers(3, config.llm.vocab_size, batch["input_ids"].shape).astype(np.int32)
  ids[batch["input_ids"] == leo_mini_lib.IMAGE_PLACEHOLDER_ID] = \
      leo_mini_lib.IMAGE_PLACEHOLDER_ID
  batch["input_ids"] = ids
  batch["image"] = rng.integers(0, 256, batch["image"].shape).astype(np.uint8)
  batch = jax.device_put(batch)
  start = time.perf_counter()
  jax.block_until_ready(compiled(params, batch))
  first_s = time.perf_counter() - start
  times = []
  for _ in range(max(1, repeats)):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, batch))
    times.append(time.perf_counter() - start)
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  del params
  return {"measured": True, "device": device.device_kind,
          "latency_s": float(np.median(times)), "compile_s": compile_s,
          "first_run_s": first_s,
          "xla_memory_bytes": xla_bytes,
          "peak_bytes_in_use": int(stats["peak_bytes_in_use"]) if stats and
          "peak_bytes_in_use" in stats else None,
          "param_dtype": str(dtype) if dtype is not None else "config"}


# ----------------------------------------------------------------------------- cross-checks


def xla_prefill_flops(config: leo_mini_lib.LeoMiniConfig, text_length: int,
                      resolution: int) -> float:
  """XLA's FLOPs of one example's prefill, on a copy whose LLM layers are unrolled.

  Counted on abstract inputs: nothing is allocated. Layer stacks under nn.scan elsewhere
  (vision towers) are still counted once by XLA; `prefill_costs` counts every layer.
  """
  unrolled = dataclasses.replace(config, llm=dataclasses.replace(config.llm,
                                                                 scan_layers=False))
  return xla_flops(prefill_program(unrolled, text_length, resolution))


def xla_flops(program: PrefillProgram) -> float:
  """XLA's `cost_analysis()['flops']` of a compiled prefill program."""
  compiled = jax.jit(program.fn).lower(program.abstract_params, program.batch).compile()
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis.get("flops", 0.0))


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
    # The batched bank computes all E experts plus the general one (docs/design.md §2.3 d).
    mmoe = sum((i + o) * m.rank * (1 + m.num_experts) for name, (i, o) in sizes.items()
               if name in m.targets)
    mmoe += d * m.router_hidden_dim + m.router_hidden_dim * m.num_experts
  per_layer = 2 * t * (linear + attention + mmoe)
  return float(config.num_layers * per_layer + 2 * t * d * config.vocab_size)
