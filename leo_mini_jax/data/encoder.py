"""One record → the fixed-shape arrays of one row (the batch contract, batch.py).

`ExampleEncoder` tokenizes a record's conversation with the template (exact loss and
instruction masks, conversation.py), fits it to max_length and brings its image to the
master resolution. It never raises on bad data: a record that fails here despite
start-up validation becomes a row with one real token and nothing to learn. It is a
plain picklable object, so grain worker processes run it. `collate` stacks rows into a
batch; the packed rows of data.packing are assembled from the same encodings
(packing.py).
"""

import dataclasses
import logging
from typing import Any, Sequence

import numpy as np

from leo_mini_jax.batch import PACKED_BATCH_KEYS
from leo_mini_jax.data import conversation as conversation_lib
from leo_mini_jax.data import images as images_lib
from leo_mini_jax.data import synthetic
from leo_mini_jax.data import tokenizers as tokenizers_lib

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ExampleEncoder:
  """Turns a source record into fixed-shape numpy arrays (+ host metadata).

  A plain picklable object so grain worker processes can run it.
  """
  tokenizer: tokenizers_lib.Tokenizer
  template: conversation_lib.Template
  max_length: int
  overlong: str
  resolution: int
  image_mean_rgb: tuple[int, ...]
  prompt_only: bool
  instruction_turns: str = "first"
  image_aspect: str = "pad"
  image_limits: images_lib.ImageLimits = images_lib.ImageLimits()
  visual_tokens: int = 1  # what the image placeholder counts against max_length

  def empty(self) -> dict[str, np.ndarray]:
    """A row with one real token and nothing to learn (padding and failed records)."""
    first = self.tokenizer.bos_id if self.tokenizer.bos_id is not None else \
        self.tokenizer.pad_id
    return self._arrays(conversation_lib.Tokenized([first], [0], [0]), None)

  def _arrays(self, tokens: conversation_lib.Tokenized,
              image: np.ndarray | None) -> dict[str, np.ndarray]:
    n, length = len(tokens), self.max_length
    has_image = image is not None
    input_ids = np.full((length,), self.tokenizer.pad_id, np.int32)
    input_ids[:n] = tokens.input_ids
    attention_mask = np.zeros((length,), np.int32)
    attention_mask[:n] = 1
    loss_mask = np.zeros((length,), np.int32)
    loss_mask[:n] = tokens.loss_mask
    instruction_mask = np.zeros((length,), np.int32)
    instruction_mask[:n] = tokens.instruction_mask
    if image is None:
      image = np.zeros((self.resolution, self.resolution, 3), np.uint8)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "loss_mask": loss_mask, "instruction_mask": instruction_mask,
            "image": image, "has_image": np.bool_(has_image)}

  def encode(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
    """The arrays of one record; raises (ValueError/OSError) when it is unusable."""
    has_image = record.get("image") is not None
    tokens, _ = conversation_lib.tokenize_record(
        record["conversations"], has_image, self.tokenizer, self.template,
        self.max_length, self.overlong, prompt_only=self.prompt_only,
        instruction_turns=self.instruction_turns, visual_tokens=self.visual_tokens)
    image = None
    if has_image:
      image = images_lib.to_master_resolution(record["image"], self.resolution,
                                              self.image_mean_rgb, self.image_aspect,
                                              self.image_limits)
    return self._arrays(tokens, image)

  def __call__(self, record: dict[str, Any]):
    """Arrays of `record` and its metadata; never raises on bad data."""
    if record.get("padding"):
      return self.empty(), {"id": "", "question_type": "", "answer": "", "valid": False}
    meta = {"id": str(record.get("id", "")),
            "question_type": str(record.get("question_type", "")),
            "answer": str(record.get("answer", "")), "valid": True}
    try:
      return self.encode(record), meta
    except Exception as e:  # pylint: disable=broad-except  (MemoryError of one image too)
      logger.warning("record %r failed in the data transform and becomes an empty row: "
                     "%s: %s", meta["id"], type(e).__name__, e)
      return self.empty(), dict(meta, valid=False)


class TrainTransform:
  """Train rows: the arrays only."""

  def __init__(self, encoder: ExampleEncoder):
    self.encoder = encoder

  def __call__(self, record):
    return self.encoder(record)[0]


def collate(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Stacks per-row arrays into the batch dict (BATCH_KEYS, plus segment_ids when the
  rows are packed)."""
  keys = [key for key in PACKED_BATCH_KEYS if key in examples[0]]
  return {key: np.stack([e[key] for e in examples]) for key in keys}


def collate_with_meta(items: Sequence[tuple[dict, dict]]) -> tuple[dict, dict]:
  """(batch dict, meta) for eval/generate rows."""
  batch = collate([example for example, _ in items])
  meta = {key: [m[key] for _, m in items] for key in ("id", "question_type", "answer")}
  meta["valid"] = np.array([m["valid"] for _, m in items], dtype=bool)
  return batch, meta


def check_synthetic_lengths(source: synthetic.SyntheticVQA, encoder: ExampleEncoder):
  """Synthetic data is valid by construction; every text it can produce must fit
  max_length untruncated (checked over the finite set of possible turns)."""
  for human, gpt in synthetic.all_turn_texts(source.question_types, source.style):
    turns = [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
    try:
      _, truncated = conversation_lib.tokenize_record(
          turns, True, encoder.tokenizer, encoder.template, encoder.max_length,
          encoder.overlong, prompt_only=encoder.prompt_only,
          visual_tokens=encoder.visual_tokens)
    except conversation_lib.ConversationError as e:
      truncated, reason = True, str(e)
    else:
      reason = "it would be truncated"
    if truncated:
      raise ValueError(
          f"synthetic {source.split} data: the turns {human!r} / {gpt!r} do not fit "
          f"data.max_length={encoder.max_length} ({reason}); raise data.max_length or "
          "set data.system_prompt=''")
