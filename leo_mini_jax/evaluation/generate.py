"""Greedy generation with the KV cache: one pure prefill, then pure one-token decode steps."""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def make_generate(model, max_new_tokens: int, eos_id: int) -> Callable:
  """Builds `generate(params, batch) -> tokens [B, max_new_tokens]` (jit-able, pure).

  After a row emits `eos_id` it keeps emitting `eos_id`; callers cut at the first one.
  """

  def generate(params: Any, batch: dict[str, jax.Array]) -> jax.Array:
    text_length = batch["input_ids"].shape[1]
    cache_size = model.sequence_length(text_length) + max_new_tokens
    logits, cache = model.apply({"params": params}, batch, cache_size, method=model.prefill)
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def body(carry, _):
      token, cache, finished = carry
      logits, cache = model.apply({"params": params}, token, cache,
                                  method=model.decode_step)
      finished = finished | (token == eos_id)
      next_token = jnp.where(finished, eos_id, jnp.argmax(logits, -1).astype(jnp.int32))
      return (next_token, cache, finished), token

    init = (first, cache, jnp.zeros_like(first, dtype=bool))
    _, tokens = jax.lax.scan(body, init, None, length=max_new_tokens)
    return tokens.T

  return generate


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
