"""LLaVA-format JSON + image folder as a grain random-access source, validated at start.

A LLaVA JSON file is a list of records:
  {"id": "...", "image": "coco/train2017/x.jpg",          # optional, relative to image_root
   "conversations": [{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt", "value": "A"}],
   "question_type": "...", "answer": "..."}                # optional, for evaluation
Records without "image" are text-only. Eval JSON carries the reference answer as the
first gpt turn (or an explicit "answer"). A `.jsonl` file holds one record per line.

Paths (the JSON, image_root) go through etils.epath, so gs:// works like a local path.
A malformed JSON file is an error naming the file, line and column. Records are checked
once before training (validation.py: fields, conversation, length, image), bad ones are
skipped and counted by reason, and with strict=True the first bad one stops the run at
start. With several processes each checks only its shard of the records.
"""

import dataclasses
import json
import logging
import os
from typing import Any, Sequence

from etils import epath

from leo_mini_jax.data import conversation as conversation_lib
from leo_mini_jax.data import images as images_lib
from leo_mini_jax.data import validation
# Re-exported: callers know these from here.
from leo_mini_jax.data.validation import (InvalidRecordError, LengthCheck,  # noqa: F401
                                          TruncationError, ValidationReport, record_id)

logger = logging.getLogger(__name__)


def _json_error(path: str, e: json.JSONDecodeError, line_offset: int = 0) -> ValueError:
  return ValueError(f"{path}:{e.lineno + line_offset}:{e.colno}: not valid JSON: {e.msg} "
                    f"(line {e.lineno + line_offset}, column {e.colno})")


def read_llava_json(path: str) -> list[Any]:
  """The record list of a LLaVA JSON (or JSON-lines) file; errors name the file and line."""
  if not path:
    raise ValueError("no LLaVA JSON path given (data.train_json / data.eval_json)")
  file = epath.Path(path)
  if not file.is_file():
    raise FileNotFoundError(f"LLaVA JSON not found: {path}")
  try:
    text = file.read_bytes().decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 text (byte {e.start}): {e.reason}") from None
  if str(path).endswith(".jsonl"):
    records = []
    for number, line in enumerate(text.splitlines(), 1):
      if line.strip():
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise _json_error(path, e, number - 1) from None
    return records
  try:
    records = json.loads(text)
  except json.JSONDecodeError as e:
    raise _json_error(path, e) from None
  if not isinstance(records, list):
    raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
  return records


def check_conversation(record: Any, has_image: bool, length_check: LengthCheck | None
                       ) -> tuple[str | None, bool]:
  """(reason the record's conversation is unusable or None, whether it gets truncated)."""
  problem = validation.check_fields(record)
  if problem is not None:
    return problem.reason, False
  result = validation.check_conversation(record, has_image, length_check)
  return (None if result.kind == "kept" else result.reason), result.truncated


def _image_path(record: dict, image_root: str) -> str | None:
  """The image's path (image_root / image) or None for a text-only record."""
  image = record.get("image")
  if image in (None, "") or not isinstance(image, str):
    return None
  return os.fspath(epath.Path(image_root) / image)


class LlavaSource:
  """Random-access source over validated LLaVA records (grain RandomAccessDataSource).

  Items: {'id', 'image': absolute path or None, 'conversations', 'question_type',
  'answer'} where 'answer' is the explicit answer or the first gpt turn ('' if none).
  """

  def __init__(self, records: Sequence[dict], image_root: str, name: str = "llava"):
    self._records = list(records)
    self._image_root = image_root
    self.name = name
    self.num_read = 0  # records this process read (its shard of each epoch)

  def __len__(self) -> int:
    return len(self._records)

  @property
  def image_root(self) -> str:
    return self._image_root

  def __repr__(self):
    return f"LlavaSource({self.name!r}, {len(self)} records)"

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self._records[int(index)]
    self.num_read += 1
    path = _image_path(record, self._image_root)
    _, reference = conversation_lib.split_for_generation(record.get("conversations") or [])
    answer = record.get("answer", reference)
    return {
        "id": record_id(record, int(index)),
        "image": path,
        "conversations": record.get("conversations"),
        "question_type": str(record.get("question_type", "")),
        "answer": "" if answer is None else str(answer),
    }


def validate_records(records: Sequence[Any], image_root: str, source_name: str, *,
                     length_check: LengthCheck | None = None, strict: bool = False,
                     image_check: str = "verify",
                     max_image_pixels: int = images_lib.MAX_IMAGE_PIXELS,
                     instruction_turns: str = "first", num_threads: int = 8,
                     shard: tuple[int, int] = (0, 1), gather=None,
                     image_limits: images_lib.ImageLimits | None = None
                     ) -> tuple[list[int], ValidationReport]:
  """(indices of usable records, report); validation.validate over LLaVA records."""
  image_of = lambda record: _image_path(record, image_root)
  return validation.validate(
      records, source_name, image_of, length_check=length_check, strict=strict,
      image_check=image_check, max_image_pixels=max_image_pixels,
      instruction_turns=instruction_turns, num_threads=num_threads, shard=shard,
      gather=gather, image_limits=image_limits)


def load_llava(json_path: str, image_root: str = "", *,
               length_check: LengthCheck | None = None, strict: bool = False,
               image_check: str = "verify", validate: bool = True,
               max_image_pixels: int = images_lib.MAX_IMAGE_PIXELS,
               instruction_turns: str = "first", shard: tuple[int, int] = (0, 1),
               gather=None, image_limits: images_lib.ImageLimits | None = None
               ) -> tuple[LlavaSource, ValidationReport | None]:
  """Reads and validates a LLaVA JSON; image paths are relative to `image_root`
  (default: the JSON's folder). Returns the source of usable records and the report.

  validate=False skips the scan (report None): for huge, already-clean sets, where a bad
  record then only becomes an empty row in the transform. `shard=(p, P)` spreads the
  checks over processes (see validation.validate). Images are checked against
  `image_limits` (default ImageLimits(max_image_pixels)) with its root set to the image
  root.
  """
  records = read_llava_json(json_path)
  if not image_root:
    image_root = os.fspath(epath.Path(json_path).parent)
    if "://" not in str(json_path):
      image_root = os.path.dirname(os.path.abspath(json_path))
  if not epath.Path(image_root).is_dir():
    raise FileNotFoundError(f"image root not found: {image_root} (data.image_root)")
  if not validate:
    return LlavaSource(records, image_root, json_path), None
  image_limits = dataclasses.replace(
      image_limits or images_lib.ImageLimits(max_pixels=max_image_pixels), root=image_root)
  kept, report = validate_records(records, image_root, json_path, length_check=length_check,
                                  strict=strict, image_check=image_check,
                                  max_image_pixels=max_image_pixels,
                                  instruction_turns=instruction_turns, shard=shard,
                                  gather=gather, image_limits=image_limits)
  return LlavaSource([records[i] for i in kept], image_root, json_path), report
