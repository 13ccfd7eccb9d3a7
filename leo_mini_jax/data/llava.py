"""LLaVA-format JSON + image folder as a grain random-access source, validated at start.

A LLaVA JSON file is a list of records:
  {"id": "...", "image": "coco/train2017/x.jpg",          # optional, relative to image_root
   "conversations": [{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt", "value": "A"}],
   "question_type": "...", "answer": "..."}                # optional, for evaluation
Records without "image" are text-only. Eval JSON carries the reference answer as the
first gpt turn (or an explicit "answer").

Validation happens once, before training starts, so a run never stops midway:
  * the conversation must be well formed (starts with human, alternates human/gpt, string
    values, at most one `<image>` marker in the first human turn, an image for a marker)
    and hold an assistant turn (except generation prompts);
  * the image must exist and pass PIL's header/structure check (`image_check='verify'`,
    no pixel decode; 'exists' only stats the file) — decoding every image of a 665K-record
    set at start would cost minutes, and the per-record transform in pipeline.py turns a
    late decode failure into a zero-loss row instead of an exception;
  * with a tokenizer, the tokenized length must fit `max_length` (overlong='truncate'
    cuts it, keeping the masks aligned, unless that removes the image placeholder or every
    assistant token; overlong='drop' rejects it).
Bad records are skipped and listed (id and reason) in a ValidationReport that is also
logged; with strict=True the first bad record (in file order) stops the run at start with
an InvalidRecordError naming its id and the reason.
"""

import concurrent.futures
import dataclasses
import json
import logging
import os
from typing import Any, Sequence

from leo_mini_jax.data import conversation as conversation_lib
from leo_mini_jax.data import images as images_lib
from leo_mini_jax.data import tokenizers as tokenizers_lib

logger = logging.getLogger(__name__)

_CHUNK = 1024  # records validated per batch of threads (strict mode stops after a chunk)


class InvalidRecordError(ValueError):
  """A record failed validation with strict=True."""


@dataclasses.dataclass
class ValidationReport:
  """What validation kept, skipped (with ids and reasons) and truncated."""
  source: str
  num_records: int = 0
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  truncated: list[str] = dataclasses.field(default_factory=list)

  @property
  def num_kept(self) -> int:
    return self.num_records - len(self.skipped)

  @property
  def num_skipped(self) -> int:
    return len(self.skipped)

  @property
  def skipped_ids(self) -> list[str]:
    return [record_id for record_id, _ in self.skipped]

  def summary(self) -> str:
    return (f"{self.source}: {self.num_records} records, {self.num_kept} kept, "
            f"{len(self.skipped)} skipped, {len(self.truncated)} truncated")

  def log(self, max_lines: int = 20):
    logger.info(self.summary())
    for record_id, reason in self.skipped[:max_lines]:
      logger.warning("%s: skipped record %r: %s", self.source, record_id, reason)
    if len(self.skipped) > max_lines:
      logger.warning("%s: ... and %d more skipped records", self.source,
                     len(self.skipped) - max_lines)


@dataclasses.dataclass(frozen=True)
class LengthCheck:
  """Everything needed to tokenize a record the way the pipeline will."""
  tokenizer: tokenizers_lib.Tokenizer
  template: Any  # conversation.Template or its name
  max_length: int
  overlong: str = "truncate"
  prompt_only: bool = False


def record_id(record: Any, index: int) -> str:
  """A record's id as a string ('#<index>' when it has none)."""
  if isinstance(record, dict) and record.get("id") not in (None, ""):
    return str(record["id"])
  return f"#{index}"


def read_llava_json(path: str) -> list[dict]:
  """The record list of a LLaVA JSON (or JSON-lines) file; errors name the file."""
  if not path:
    raise ValueError("no LLaVA JSON path given (data.train_json / data.eval_json)")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"LLaVA JSON not found: {path}")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  try:
    if path.endswith(".jsonl"):
      records = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
      records = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON: {e}") from None
  if not isinstance(records, list):
    raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
  return records


def check_conversation(record: Any, has_image: bool,
                       length_check: LengthCheck | None) -> tuple[str | None, bool]:
  """(reason the record's conversation is unusable or None, whether it gets truncated)."""
  if not isinstance(record, dict):
    return f"record is a {type(record).__name__}, not an object", False
  conversations = record.get("conversations")
  prompt_only = length_check is not None and length_check.prompt_only
  try:
    if prompt_only:
      turns, _ = conversation_lib.split_for_generation(conversations or [])
      turns = conversation_lib.place_image_marker(
          conversation_lib.normalize_turns(turns), has_image)
      conversation_lib.normalize_turns(conversations)  # the whole record must be sane
    else:
      turns = conversation_lib.place_image_marker(
          conversation_lib.normalize_turns(conversations), has_image)
      if not any(role == "gpt" for role, _ in turns):
        return "no assistant (gpt) turn", False
    if length_check is None:
      return None, False
    _, truncated = conversation_lib.tokenize_record(
        conversations, has_image, length_check.tokenizer, length_check.template,
        length_check.max_length, length_check.overlong, prompt_only=prompt_only)
    return None, truncated
  except (conversation_lib.ConversationError, KeyError) as e:
    return str(e).strip("'\""), False


def _image_path(record: dict, image_root: str) -> tuple[str | None, str | None]:
  """(absolute image path or None for text-only, reason if the field is malformed)."""
  image = record.get("image")
  if image in (None, ""):
    return None, None
  if not isinstance(image, str):
    return None, f"'image' must be one relative path, got {type(image).__name__}"
  return os.path.join(image_root, image), None


class LlavaSource:
  """Random-access source over validated LLaVA records (grain RandomAccessDataSource).

  Items: {'id', 'image': absolute path or None, 'conversations', 'question_type',
  'answer'} where 'answer' is the explicit answer or the first gpt turn ('' if none).
  """

  def __init__(self, records: Sequence[dict], image_root: str, name: str = "llava"):
    self._records = list(records)
    self._image_root = image_root
    self.name = name

  def __len__(self) -> int:
    return len(self._records)

  def __repr__(self):
    return f"LlavaSource({self.name!r}, {len(self)} records)"

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self._records[int(index)]
    path, _ = _image_path(record, self._image_root)
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
                     image_check: str = "verify", num_threads: int = 8
                     ) -> tuple[list[int], ValidationReport]:
  """(indices of usable records, report). See the module docstring for the checks."""
  report = ValidationReport(source=source_name, num_records=len(records))
  kept = []

  def check(index: int) -> tuple[str | None, bool]:
    record = records[index]
    if not isinstance(record, dict):
      return f"record is a {type(record).__name__}, not an object", False
    path, reason = _image_path(record, image_root)
    truncated = False
    if reason is None:
      reason, truncated = check_conversation(record, path is not None, length_check)
    if reason is None and path is not None:
      reason = images_lib.check_image_file(path, image_check)
    return reason, (reason is None and truncated)

  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
    for start in range(0, len(records), _CHUNK):
      indices = range(start, min(start + _CHUNK, len(records)))
      for index, (reason, truncated) in zip(indices, pool.map(check, indices)):
        rid = record_id(records[index], index)
        if reason is not None:
          if strict:
            raise InvalidRecordError(
                f"{source_name}: record {rid!r} (#{index}): {reason} (strict=True; set "
                "data.strict=False to skip bad records)")
          report.skipped.append((rid, reason))
          continue
        if truncated:
          report.truncated.append(rid)
        kept.append(index)
  return kept, report


def load_llava(json_path: str, image_root: str = "", *,
               length_check: LengthCheck | None = None, strict: bool = False,
               image_check: str = "verify", validate: bool = True
               ) -> tuple[LlavaSource, ValidationReport | None]:
  """Reads and validates a LLaVA JSON; image paths are relative to `image_root`
  (default: the JSON's folder). Returns the source of usable records and the report.

  validate=False skips the scan (report None): for huge, already-clean sets, where a bad
  record then only becomes an empty row in the transform.
  """
  records = read_llava_json(json_path)
  if not image_root:
    image_root = os.path.dirname(os.path.abspath(json_path))
  if not os.path.isdir(image_root):
    raise FileNotFoundError(f"image root not found: {image_root} (data.image_root)")
  if not validate:
    return LlavaSource(records, image_root, json_path), None
  kept, report = validate_records(records, image_root, json_path, length_check=length_check,
                                  strict=strict, image_check=image_check)
  report.log()
  return LlavaSource([records[i] for i in kept], image_root, json_path), report
