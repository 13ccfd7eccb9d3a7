"""The LLM's input sequence: text rows with visual tokens inserted, in examples (segments).

A row of the batch holds one example (unpacked) or several (packed: `segment_ids`, see
`leo_mini_jax/batch.py`). Either way the model sees the same thing: K image slots per row,
the k-th image placeholder of a row expanding into slot k's N^V visual tokens, and every
LLM token labelled with the example (segment) it belongs to. An unpacked batch is the
case K = 1 with one segment per row (`as_packed`), so both run the same code.

Per segment, not per row:
  * rotary positions restart at 0 at each example's first token (`segment_positions`);
  * attention is causal within a segment and blind across segments (the LLM masks with
    the segment ids it is given);
  * CoTR's text query pools only the instruction tokens of the image's own example
    (`image_text_masks`), and the MMoE router context pools each example's own visual and
    instruction tokens (`segment_means`);
  * a target that would cross into the next example is not supervised.

So an example's logits, loss and routing do not depend on what shares its row.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from leo_mini_jax.batch import IMAGE_PLACEHOLDER_ID

Array = jax.Array


def is_packed(batch: dict[str, Array]) -> bool:
  return "segment_ids" in batch


def as_packed(batch: dict[str, Array]) -> dict[str, Array]:
  """The batch in packed form: image [B, K, R, R, 3], has_image [B, K], segment_ids [B, L].

  An unpacked batch becomes K = 1 with segment 1 on its real tokens.
  """
  if is_packed(batch):
    return batch
  out = dict(batch)
  for key in ("image", "has_image"):
    if key in batch:
      out[key] = batch[key][:, None]
  out["segment_ids"] = (batch["attention_mask"] > 0).astype(jnp.int32)
  return out


def image_slots(input_ids: Array, has_image: Array) -> tuple[Array, Array]:
  """Where each image slot's placeholder is.

  Args:
    input_ids: [B, L] with IMAGE_PLACEHOLDER_ID at image positions.
    has_image: [B, K] which slots hold an image.

  Returns:
    position [B, K] of the k-th placeholder of each row (0 when there is none) and
    active [B, K]: slot k has both a placeholder and an image. A placeholder without an
    image (or past slot K − 1) stays one position wide and is dropped like padding.
  """
  num_slots = has_image.shape[1]
  placeholder = input_ids == IMAGE_PLACEHOLDER_ID
  rank = jnp.cumsum(placeholder, axis=1)  # k + 1 at the k-th placeholder
  slot = jnp.arange(num_slots)[None, :, None]
  is_kth = placeholder[:, None, :] & (rank[:, None, :] == slot + 1)  # [B, K, L]
  position = jnp.argmax(is_kth, axis=-1)
  active = jnp.any(is_kth, axis=-1) & has_image.astype(bool)
  return position, active


def image_text_masks(batch: dict[str, Array], position: Array, active: Array) -> Array:
  """[B, K, L]: for image slot k, the instruction tokens of the example that owns it."""
  segment_ids = batch["segment_ids"]
  image_segment = jnp.take_along_axis(segment_ids, position, axis=1)  # [B, K]
  own = segment_ids[:, None, :] == image_segment[:, :, None]
  instruction = batch.get("instruction_mask", jnp.zeros_like(segment_ids))
  return own & (instruction[:, None, :] > 0) & active[:, :, None]


def segment_positions(segment_ids: Array) -> Array:
  """[B, T] → rotary positions that restart at 0 where the segment id changes."""
  length = segment_ids.shape[1]
  index = jnp.arange(length, dtype=jnp.int32)[None, :]
  change = jnp.concatenate(
      [jnp.ones_like(segment_ids[:, :1], dtype=bool),
       segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  start = jax.lax.cummax(jnp.where(change, index, 0), axis=1)
  return index - start


def segment_means(values: Array, weights: Array, segment_ids: Array, num_segments: int
                  ) -> Array:
  """Weighted means of `values` per segment of each row, in float32.

  Args:
    values: [B, N, C]; weights: [B, N] (0 excludes); segment_ids: [B, N], ids at or above
      `num_segments` are left out.

  Returns:
    [B, num_segments, C]: entry [b, s] is the mean over row b's positions of segment s
    (zeros for a segment with no weight), so `take_along_axis(means, ids)` gives every
    position its own segment's mean. One scatter-add, linear in N (no [N, N] mask).
  """
  weights = jnp.where(segment_ids < num_segments, weights.astype(jnp.float32), 0.0)
  ids = jnp.minimum(segment_ids, num_segments - 1)

  def one_row(row_values, row_weights, row_ids):  # per row: the batch axis stays sharded
    total = jax.ops.segment_sum(row_values.astype(jnp.float32) * row_weights[:, None],
                                row_ids, num_segments=num_segments)
    count = jax.ops.segment_sum(row_weights, row_ids, num_segments=num_segments)
    return total / jnp.maximum(count, 1.0)[:, None]

  means = jax.vmap(one_row)(values, weights, ids)
  return nn.with_logical_constraint(means, ("activation_batch", None, None))


def assemble_sequence(text_embeds: Array, visual_tokens: Array, batch: dict[str, Array]
                      ) -> dict[str, Array]:
  """Places each image slot's visual tokens at its placeholder.

  Args:
    text_embeds: [B, L, D] embeddings of input_ids (placeholder rows arbitrary).
    visual_tokens: [B, K, N^V, D] projected visual tokens per slot ([B, N^V, D]: K = 1).
    batch: input_ids, attention_mask, has_image ([B, K] or [B]), optionally segment_ids
      and loss_mask [B, L].

  Returns:
    dict of [B, L + K(N^V − 1), ...] arrays: inputs_embeds, attention_mask, is_visual,
    segment_ids (0 on padding and dropped placeholders), positions (restarting per
    segment), targets (the next token) and target_mask (supervised and in the same
    segment).
  """
  if visual_tokens.ndim == 3:
    visual_tokens = visual_tokens[:, None]
  batch = as_packed(batch)
  input_ids = batch["input_ids"]
  batch_size, length = input_ids.shape
  num_slots, num_visual = visual_tokens.shape[1], visual_tokens.shape[2]
  out_length = length + num_slots * (num_visual - 1)
  position, active = image_slots(input_ids, batch["has_image"])
  widened_before = jnp.cumsum(active, axis=1) - active  # active slots before slot k
  start = position + (num_visual - 1) * widened_before  # [B, K] first visual position
  out_pos = jnp.arange(out_length)[None, :, None]  # [1, T, 1]
  start_, active_ = start[:, None, :], active[:, None, :]
  in_slot = active_ & (out_pos >= start_) & (out_pos < start_ + num_visual)  # [B, T, K]
  is_visual = jnp.any(in_slot, axis=-1)
  slot = jnp.argmax(in_slot, axis=-1)  # [B, T]
  passed = jnp.sum(active_ & (out_pos >= start_ + num_visual), axis=-1)
  text_index = out_pos[..., 0] - (num_visual - 1) * passed
  clipped = jnp.clip(text_index, 0, length - 1)
  take = lambda x: jnp.take_along_axis(x, clipped, axis=1)
  placeholder = input_ids == IMAGE_PLACEHOLDER_ID
  text_valid = ((text_index < length) & ~is_visual & (take(batch["attention_mask"]) > 0)
                & ~take(placeholder))
  visual_index = jnp.clip(out_pos[..., 0] - jnp.take_along_axis(start, slot, axis=1), 0,
                          num_visual - 1)
  flat_visual = visual_tokens.reshape(batch_size, num_slots * num_visual, -1)
  visual = jnp.take_along_axis(flat_visual, (slot * num_visual + visual_index)[..., None],
                               axis=1)
  text = jnp.take_along_axis(text_embeds, clipped[..., None], axis=1)
  inputs_embeds = jnp.where(is_visual[..., None], visual.astype(text.dtype),
                            jnp.where(text_valid[..., None], text, 0))
  real = is_visual | text_valid
  segment_ids = batch["segment_ids"]
  slot_segment = jnp.take_along_axis(segment_ids, position, axis=1)  # [B, K]
  # Positions follow the example the position sits in, holes included (as a row's own
  # arange does), so a packed example is numbered exactly as it would be alone.
  raw_segment = jnp.where(is_visual, jnp.take_along_axis(slot_segment, slot, axis=1),
                          jnp.where(text_index < length, take(segment_ids), 0))
  token_ids = jnp.where(text_valid, take(input_ids), 0)
  loss_mask = batch.get("loss_mask")
  loss_mask = (jnp.zeros_like(text_valid) if loss_mask is None
               else text_valid & (take(loss_mask) > 0))
  segment = jnp.where(real, raw_segment, 0)
  shift = lambda x: jnp.concatenate([x[:, 1:], jnp.zeros_like(x[:, :1])], axis=1)
  same_segment = segment == shift(segment)
  return {
      "inputs_embeds": inputs_embeds,
      "attention_mask": real.astype(jnp.int32),
      "is_visual": is_visual,
      "segment_ids": segment.astype(jnp.int32),
      "positions": segment_positions(raw_segment),
      "targets": shift(token_ids),
      "target_mask": (shift(loss_mask) & same_segment).astype(jnp.int32),
  }
