"""Greedy generation with the KV cache, batched by prompt length, data-parallel.

`make_generate` is one pure prefill plus pure one-token decode steps. `BatchGenerator`
runs it over any number of prompts at scale:

  * prompts are sorted by token length and cut into global batches; each batch is padded
    only to its length bucket (16·2^k or 24·2^k tokens), never to data.max_length, so a
    handful of shapes are compiled and no prompt is skipped for length (one longer than
    the model's context is an error naming it);
  * every global batch is split over all devices of the mesh ('data' × 'fsdp'); each
    process builds only its rows (`make_array_from_process_local_data`), every process
    runs the same batches in the same order (so all stop at the same step), and the
    generated tokens come back replicated, so process 0 can decode and write them all;
  * with MMoE-LLM, the routing of every prompt token (how many tokens each layer sends to
    each expert) is counted on device from the prefill that generation runs anyway.
"""

import concurrent.futures
import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from leo_mini_jax.data import conversation as conversation_lib
from leo_mini_jax.parallel import mesh as mesh_lib

# Answer length where neither a benchmark nor eval.max_new_tokens (0) sets one: the
# held-out split and `ask`.
DEFAULT_ANSWER_TOKENS = 16


def make_generate(model, max_new_tokens: int, eos_id: int,
                  choose: Callable[[jax.Array, jax.Array | None], jax.Array] | None = None
                  ) -> Callable:
  """Builds `generate(params, batch, valid=None, key=None) -> dict` (jit-able, pure).

  Decoding stops once every row (but those `valid` marks false) has emitted `eos_id`, or
  after `max_new_tokens` steps: a benchmark allowing 1024 tokens costs only as many steps
  as its longest answer in the batch. The dict holds `tokens` [B, max_new_tokens] (eos_id
  after a row's end), `steps` (the decode steps run); with MMoE-LLM also the routing the
  generation computed anyway (no extra forward):
    `prompt_counts` [layers, E]: first-choice experts of the real prompt tokens (visual
      and text) of the rows where `valid` [B] is true (default all), from the prefill;
    `top_expert` [layers, B, max_new_tokens]: the first-choice expert of each generated
      token, from the decode step that fed it back (-1 after the loop stopped). Every
      generated token is fed (step i feeds token i and keeps its output token only for
      step i + 1), so the last one has its routing too.
  After a row emits `eos_id` it keeps emitting `eos_id`; callers cut at the first one.
  `choose(logits [B, V], key) -> ids [B]` picks each token (default greedy argmax); with
  `key`, step i gets the i-th of `max_new_tokens + 1` splits of it.
  """
  if choose is None:
    choose = lambda logits, key: jnp.argmax(logits, axis=-1).astype(jnp.int32)
  mmoe = model.config.llm.mmoe.enabled

  def generate(params: Any, batch: dict[str, jax.Array], valid: jax.Array | None = None,
               key: jax.Array | None = None) -> dict[str, jax.Array]:
    text_length = batch["input_ids"].shape[1]
    cache_size = model.sequence_length(text_length) + max_new_tokens
    logits, cache, prompt_routing = model.apply({"params": params}, batch, cache_size,
                                                method=model.prefill)
    first_key, step_keys = None, None
    if key is not None:
      keys = jax.random.split(key, max_new_tokens + 1)
      first_key, step_keys = keys[0], keys[1:]
    first = choose(logits, first_key)

    batch_size = first.shape[0]
    # Rows that need no answer (padding) do not hold the loop open.
    ignore = jnp.zeros_like(first, dtype=bool) if valid is None else ~valid.astype(bool)

    def cond(carry):
      step, token, _, finished, _, _ = carry
      return (step < max_new_tokens) & ~jnp.all(finished | (token == eos_id) | ignore)

    def body(carry):
      step, token, cache, finished, tokens, top = carry
      logits, cache, routing = model.apply({"params": params}, token, cache,
                                           method=model.decode_step)
      finished = finished | (token == eos_id)
      step_key = None if step_keys is None else step_keys[step]
      next_token = jnp.where(finished, eos_id, choose(logits, step_key))
      tokens = tokens.at[:, step].set(token)
      if mmoe:
        top = top.at[:, :, step].set(routing["top_expert"][:, :, 0])
      return step + 1, next_token, cache, finished, tokens, top

    layers = model.config.llm.num_layers
    init = (jnp.zeros((), jnp.int32), first, cache, jnp.zeros_like(first, dtype=bool),
            jnp.full((batch_size, max_new_tokens), eos_id, jnp.int32),
            jnp.full((layers, batch_size, max_new_tokens) if mmoe else (0,), -1, jnp.int32))
    steps, _, _, _, tokens, top = jax.lax.while_loop(cond, body, init)
    out = {"tokens": tokens, "steps": steps}
    if mmoe:
      out["top_expert"] = top
      out["prompt_counts"] = prompt_counts(prompt_routing["top_expert"], cache["lengths"],
                                           valid, model.config.llm.mmoe.num_experts)
    return out

  return generate


def prompt_counts(top_expert: jax.Array, lengths: jax.Array, valid: jax.Array | None,
                  num_experts: int) -> jax.Array:
  """[layers, E] tokens routed to each expert: the first `lengths` [B] tokens of every
  row of `top_expert` [layers, B, T] (prefill's real prompt tokens), valid rows only."""
  positions = jnp.arange(top_expert.shape[-1])
  mask = positions[None, :] < lengths[:, None]
  if valid is not None:
    mask = mask & valid[:, None]
  hits = (top_expert[..., None] == jnp.arange(num_experts)) & mask[None, :, :, None]
  return jnp.sum(hits, axis=(1, 2)).astype(jnp.float32)


def decode_answers(tokens: np.ndarray, tokenizer, stop_ids: tuple[int, ...]) -> list[str]:
  """Token rows → strings, cut at the first stop token."""
  answers = []
  for row in np.asarray(tokens):
    ids = []
    for token in row.tolist():
      if token in stop_ids:
        break
      ids.append(token)
    answers.append(tokenizer.decode(ids).strip())
  return answers


def build_prompt(question: str, tokenizer, template, has_image: bool
                 ) -> conversation_lib.Tokenized:
  """One user turn (`<image>\\n` is prepended when there is an image) + the assistant
  header, through the conversation template: what the model answers.

  A marker the question already holds stays where it is (MMMU puts it at its `<image k>`
  tag), as lmms-eval's LLaVA-family models do; only training data moves it to the front.
  """
  turns = [{"from": "human", "value": question}]
  return conversation_lib.tokenize_prompt(turns, tokenizer, template, has_image=has_image,
                                          image_position="as_is")


def bucket_length(length: int) -> int:
  """The padded text length of a batch whose longest prompt has `length` tokens:
  the smallest 16·2^k or 24·2^k ≥ length (at most 1.5× padding, few shapes)."""
  k = 0
  while True:
    for base in (16, 24):
      if base << k >= length:
        return base << k
    k += 1


@dataclasses.dataclass
class Prompt:
  """A tokenized prompt and its image source (path, bytes, array, or None)."""
  tokens: conversation_lib.Tokenized
  image: Any = None


@dataclasses.dataclass
class Generation:
  """Output of `BatchGenerator`: tokens per prompt (input order), routing counts."""
  tokens: list[np.ndarray]
  routing: np.ndarray | None  # [layers, E] token counts, None without MMoE-LLM
  failed: list[tuple[int, str]]  # (prompt index, reason): images that failed to load


class BatchGenerator:
  """Generates for lists of prompts on `setup.mesh` (all devices, all processes).

  Holds the jitted programs, one per answer length (`max_new_tokens` of a call, default
  the constructor's), so benchmarks with the same length share their compilations (one
  per prompt-length bucket).
  """

  def __init__(self, setup, *, max_new_tokens: int, eos_id: int, routing: bool = True):
    self.setup = setup
    self.max_new_tokens, self.eos_id = int(max_new_tokens), eos_id
    self.programs: dict[int, Callable] = {}
    self.routing = routing and setup.model.config.llm.mmoe.enabled

  def program(self, max_new_tokens: int) -> Callable:
    """The jitted generate for answers of `max_new_tokens` tokens (built once)."""
    if max_new_tokens not in self.programs:
      self.programs[max_new_tokens] = jax.jit(
          make_generate(self.setup.model, max_new_tokens, self.eos_id),
          out_shardings=self.setup.replicated)
    return self.programs[max_new_tokens]

  @property
  def generate(self) -> Callable:
    return self.program(self.max_new_tokens)

  def __call__(self, params: Any, prompts: Sequence[Prompt], *, batch_size: int,
               resolution: int, load_image: Callable[[Any], np.ndarray], pad_id: int = 0,
               names: Sequence[str] | None = None,
               progress: Callable[[int, int], None] | None = None,
               max_new_tokens: int | None = None) -> Generation:
    """Tokens for every prompt ([max_new_tokens] each).

    Args:
      params: the model parameters (sharded by the setup).
      prompts: the same list on every process.
      batch_size: global rows per step; must divide by the process count and the mesh's
        batch axes.
      load_image: image source → uint8 [S, S, 3]; may raise (the row is then reported in
        `failed` and generated without the image: callers drop it).
      names: prompt names for error messages (e.g. benchmark/record ids).
      progress: called with (prompts done, prompts) after every batch.
      max_new_tokens: the answer length (default: the constructor's).
    """
    generate = self.program(int(max_new_tokens or self.max_new_tokens))
    setup = self.setup
    model = setup.model
    context = model.config.llm.max_position_embeddings
    for index, prompt in enumerate(prompts):
      needed = model.sequence_length(len(prompt.tokens))
      if needed > context:
        name = names[index] if names else f"prompt #{index}"
        raise ValueError(f"{name}: prompt of {len(prompt.tokens)} tokens ({needed} with "
                         f"the visual tokens) exceeds the model's context of {context}")
    processes, process = jax.process_count(), jax.process_index()
    data_devices = math.prod(setup.mesh.shape[a] for a in mesh_lib.BATCH_AXES)
    if batch_size % processes or batch_size % data_devices:
      raise ValueError(f"eval.batch_size={batch_size} must be divisible by the process "
                       f"count ({processes}) and the mesh's data×fsdp size ({data_devices})")
    local = batch_size // processes
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].tokens))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    tokens: list[np.ndarray | None] = [None] * len(prompts)
    failed: list[tuple[int, str]] = []
    routed = None
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool, \
        mesh_lib.activate(setup.mesh, setup.rules):
      for step, indices in enumerate(batches):
        length = bucket_length(max(len(prompts[i].tokens) for i in indices))
        rows = indices[process * local:(process + 1) * local]
        batch, valid, errors = _local_batch(prompts, rows, local, length, resolution,
                                            load_image, pad_id, pool)
        failed += errors
        global_batch = setup.global_batch(batch)
        valid_global = mesh_lib.make_global_batch({"valid": valid}, setup.mesh)["valid"]
        result = generate(params, global_batch, valid_global)
        out = np.asarray(jax.device_get(result["tokens"]))
        if self.routing:
          counts = np.asarray(jax.device_get(result["prompt_counts"]))
          routed = counts if routed is None else routed + counts
        for position, index in enumerate(indices):
          tokens[index] = out[position]
        if progress is not None:
          progress(min((step + 1) * batch_size, len(prompts)), len(prompts))
    if processes > 1:
      failed = _gather_failures(failed)
    return Generation(tokens, routed, sorted(failed))


def _local_batch(prompts, rows, local, length, resolution, load_image, pad_id, pool):
  """This process's rows of one global batch (padding rows fill a short last batch)."""
  input_ids = np.full((local, length), pad_id, np.int32)
  attention = np.zeros((local, length), np.int32)
  instruction = np.zeros((local, length), np.int32)
  images = np.zeros((local, resolution, resolution, 3), np.uint8)
  has_image = np.zeros((local,), bool)
  valid = np.zeros((local,), bool)
  errors = []
  sources = {r: prompts[i].image for r, i in enumerate(rows) if prompts[i].image is not None}
  loaded = dict(zip(sources, pool.map(lambda s: _try(load_image, s), sources.values())))
  for r, index in enumerate(rows):
    t = prompts[index].tokens
    n = len(t)
    input_ids[r, :n], attention[r, :n], instruction[r, :n] = (
        t.input_ids, 1, t.instruction_mask)
    valid[r] = True
    if r in loaded:
      image, error = loaded[r]
      if error is not None:
        errors.append((index, error))
        valid[r] = False
      else:
        images[r], has_image[r] = image, True
  for r in range(len(rows), local):  # a padding row: one token, no image
    attention[r, 0] = 1
  batch = {"input_ids": input_ids, "attention_mask": attention,
           "loss_mask": np.zeros_like(attention), "instruction_mask": instruction,
           "image": images, "has_image": has_image}
  return batch, valid, errors


def _try(fn, arg):
  try:
    return fn(arg), None
  except (OSError, ValueError, TypeError) as e:
    return None, f"{type(e).__name__}: {e}"


def _gather_failures(failed):
  """Every process's image failures, on every process (they are few: sent as JSON)."""
  import json  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  payload = np.frombuffer(json.dumps(failed).encode(), np.uint8)
  size = int(np.max(multihost_utils.process_allgather(np.array([payload.size]))))
  padded = np.zeros((size,), np.uint8)
  padded[:payload.size] = payload
  gathered = multihost_utils.process_allgather(padded)
  out = []
  for row in np.asarray(gathered).reshape(-1, size):
    out += [tuple(x) for x in json.loads(bytes(row).rstrip(b"\0").decode() or "[]")]
  return out
