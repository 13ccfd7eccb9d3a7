"""The batch contract between the data pipeline and the model.

The pipeline (`data/`) produces batches with these keys; the model (`models/`) reads them.
Both import this module, so neither depends on the other for the contract:

  input_ids         int32 [B, L]: token ids, one IMAGE_PLACEHOLDER_ID per image example
  attention_mask    int32 [B, L]: 1 on real tokens
  loss_mask         int32 [B, L]: 1 on supervised (answer) tokens
  instruction_mask  int32 [B, L]: 1 on instruction tokens (CoTR's text query)
  image             uint8 [B, R, R, 3]: one master-resolution image per example
  has_image         bool [B]: False for text-only examples

Packed batches (data.packing=True) hold several examples per row, K = data.max_images_per_row:

  input_ids, attention_mask, loss_mask, instruction_mask   [B, L] as above
  segment_ids       int32 [B, L]: which example of the row each token belongs to, 1, 2, ...
                    in row order, each example's tokens contiguous; 0 on padding
  image             uint8 [B, K, R, R, 3]: the row's images in the order of its placeholders
                    (the k-th placeholder of a row is image slot k); zeros in unused slots
  has_image         bool [B, K]: False for unused slots

A batch is packed iff it has 'segment_ids'. The model inserts each image's visual tokens at
its placeholder, restarts rotary positions at 0 for every example, attends only within an
example, and conditions CoTR and the MMoE router on each example's own tokens, so an
example's logits do not depend on what else shares its row.
"""

import jax
import ml_collections
import numpy as np

BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask", "instruction_mask", "image",
              "has_image")
PACKED_BATCH_KEYS = BATCH_KEYS + ("segment_ids",)
# The token the model replaces with the example's visual tokens (LLaVA's IMAGE_TOKEN_INDEX).
IMAGE_PLACEHOLDER_ID = -200


def is_packed_config(config: ml_collections.ConfigDict) -> bool:
  """Whether the config's training batches are packed (data.packing)."""
  return bool(config.data.get("packing", False))


def batch_keys(batch: dict) -> tuple[str, ...]:
  """The contract keys of `batch`, packed or not."""
  return PACKED_BATCH_KEYS if "segment_ids" in batch else BATCH_KEYS


def dummy_batch(config: ml_collections.ConfigDict, batch_size: int = 1,
                packed: bool | None = None) -> dict[str, np.ndarray]:
  """A zero batch with the pipeline's shapes (for init and abstract compilation).

  packed: the training batches' form (default: data.packing); evaluation and generation
  batches are never packed.
  """
  length, resolution = config.data.max_length, config.data.resolution
  packed = is_packed_config(config) if packed is None else packed
  ids = np.zeros((batch_size, length), np.int32)
  ids[:, 1] = IMAGE_PLACEHOLDER_ID
  slots = (int(config.data.get("max_images_per_row", 1)),) if packed else ()
  batch = {
      "input_ids": ids,
      "attention_mask": np.ones((batch_size, length), np.int32),
      "loss_mask": np.zeros((batch_size, length), np.int32),
      "instruction_mask": np.zeros((batch_size, length), np.int32),
      "image": np.zeros((batch_size,) + slots + (resolution, resolution, 3), np.uint8),
      "has_image": np.zeros((batch_size,) + slots, bool),
  }
  batch["has_image"][(slice(None),) + (0,) * len(slots)] = True
  if packed:
    batch["segment_ids"] = np.ones((batch_size, length), np.int32)
  return batch


def abstract_batch(config: ml_collections.ConfigDict, batch_size: int, sharding=None,
                   packed: bool | None = None) -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes and dtypes of a `batch_size`-row batch (no memory), in `sharding`."""
  row = dummy_batch(config, 1, packed)
  return {k: jax.ShapeDtypeStruct((batch_size,) + v.shape[1:], v.dtype, sharding=sharding)
          for k, v in row.items()}


def llm_length_limit(data_cfg) -> int:
  """The LLM sequence length the model may cut its rows to: data.max_length when
  data.max_length_counts_visual_tokens (the rows were fitted to it), else 0 (no limit:
  a row is max_length + N^V − 1 long)."""
  return int(data_cfg.max_length) if data_cfg.get("max_length_counts_visual_tokens") else 0
