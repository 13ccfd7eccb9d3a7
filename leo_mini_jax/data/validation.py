"""Start-up validation of conversation records: what is kept, skipped (by reason) and cut.

Every source (LLaVA JSON, a TFDS build) runs its records through `check_record` once,
before step 0, so a run never stops midway and never trains on a silently wrong row:

  * the record: an object whose 'id' (if any) is a string or number, whose 'image' is
    one relative path, whose 'question_type' / 'answer' (if any) are text;
  * the conversation (conversation.py): starts with human, alternates, string values,
    no empty answer, an assistant turn (except generation prompts), one `<image>` marker
    in the first human turn iff there is an image;
  * the length against `max_length`: a record longer than it is truncated (or dropped
    with overlong='drop'); the report counts such records and the supervised (answer)
    tokens they lose, and records the length that would keep every record whole;
  * the image (images.image_problem): a regular file inside the image root, not empty,
    within the images.ImageLimits (bytes, pixels, aspect ratio), decodable as far as the
    check mode goes.

Whatever a record makes the checks raise (a lone UTF-16 surrogate that no tokenizer can
encode, a MemoryError from one image) skips that record, counted by reason and named.

Skipped records are counted by reason kind (REASON_KINDS) and listed with their id and
the full reason. With strict=True the first bad record in file order stops the run at
start (InvalidRecordError). `enforce_length_policy` then stops the run when more than
`max_truncated_fraction` of the records would be cut by max_length (truncated, or
skipped because they do not fit) unless truncation is explicitly allowed: a record cut to
its first answer token trains on a fragment that is trivially predictable (the space
after "ASSISTANT:") and shows as a near-zero loss.

Spreading the work over processes: with `shard=(p, P)` a process checks only records
p, p+P, ... and `gather` (an all-gather of a small int32 status table) gives every
process the same global result, so all of them keep the same records and agree on
stopping. The default gather is jax's `process_allgather` when the jax runtime has P
processes; otherwise (P simulated in one process) every record is checked locally.
"""

import collections
import concurrent.futures
import dataclasses
import logging
from typing import Any, Callable, Sequence

import numpy as np

from leo_mini_jax.data import conversation as conversation_lib
from leo_mini_jax.data import images as images_lib
from leo_mini_jax.data import tokenizers as tokenizers_lib

logger = logging.getLogger(__name__)

_CHUNK = 1024  # records checked per batch of threads (strict mode stops after a chunk)
# Why a record was skipped; the status table carries the index into this tuple.
REASON_KINDS = ("kept", "not_an_object", "bad_field", "bad_conversation",
                "no_assistant_turn", "too_long", "image_missing", "image_empty",
                "image_too_large", "image_unreadable", "image_bad_shape", "image_bad_path")
# kind, truncated, full length, lost supervised, supervised tokens, has an image
_STATUS_FIELDS = 6


class InvalidRecordError(ValueError):
  """A record failed validation with strict=True."""


class TruncationError(ValueError):
  """Too many records would be cut by data.max_length."""


@dataclasses.dataclass(frozen=True)
class LengthCheck:
  """Everything needed to tokenize a record the way the pipeline will, and the policy
  for records that do not fit."""
  tokenizer: tokenizers_lib.Tokenizer
  template: Any  # conversation.Template or its name
  max_length: int
  overlong: str = "truncate"
  prompt_only: bool = False
  allow_truncation: bool = False
  max_truncated_fraction: float = 0.01
  visual_tokens: int = 1  # what the image placeholder counts against max_length


@dataclasses.dataclass(frozen=True)
class RecordCheck:
  """What checking one record found."""
  kind: str = "kept"  # one of REASON_KINDS
  reason: str = ""
  truncated: bool = False
  length: int = 0  # full token count (0 when not tokenized)
  lost_tokens: int = 0  # supervised tokens removed by truncation
  supervised_tokens: int = 0  # supervised tokens before truncation
  has_image: bool = False

  def row(self) -> list[int]:
    return [REASON_KINDS.index(self.kind), int(self.truncated), self.length,
            self.lost_tokens, self.supervised_tokens, int(self.has_image)]


@dataclasses.dataclass
class ValidationReport:
  """What validation kept, skipped (with ids, reasons and counts by kind) and truncated."""
  source: str
  num_records: int = 0
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  truncated: list[str] = dataclasses.field(default_factory=list)
  reason_counts: dict[str, int] = dataclasses.field(default_factory=dict)
  lost_tokens: int = 0  # supervised tokens cut from truncated records
  supervised_tokens: int = 0  # supervised tokens of the kept records before truncation
  length_needed: int = 0  # the max_length that keeps every tokenized record whole
  max_length: int | None = None
  num_checked: int = 0  # records this process opened and checked (its shard)
  # Per kept record, in kept order: its full token count as max_length counts it (the
  # packing planner's cost, packing.py) and whether it has an image.
  kept_lengths: list[int] = dataclasses.field(default_factory=list)
  kept_images: list[bool] = dataclasses.field(default_factory=list)

  @property
  def num_kept(self) -> int:
    return self.num_records - len(self.skipped)

  @property
  def num_skipped(self) -> int:
    return len(self.skipped)

  @property
  def skipped_ids(self) -> list[str]:
    return [record_id for record_id, _ in self.skipped]

  @property
  def num_cut(self) -> int:
    """Records max_length truncates or rejects."""
    return len(self.truncated) + self.reason_counts.get("too_long", 0)

  def summary(self) -> str:
    text = (f"{self.source}: {self.num_records} records, {self.num_kept} kept, "
            f"{len(self.skipped)} skipped")
    if self.reason_counts:
      text += " (" + ", ".join(f"{kind}: {n}" for kind, n in
                               sorted(self.reason_counts.items())) + ")"
    text += f", {len(self.truncated)} truncated"
    if self.max_length is not None:
      text += (f" ({self.lost_tokens} of {self.supervised_tokens} supervised tokens "
               f"lost at data.max_length={self.max_length}; "
               f"data.max_length={self.length_needed} keeps every record)")
    return text

  def log(self, max_lines: int = 20):
    level = logging.WARNING if (self.skipped or self.truncated) else logging.INFO
    logger.log(level, self.summary())
    for record_id, reason in self.skipped[:max_lines]:
      logger.warning("%s: skipped record %r: %s", self.source, record_id, reason)
    if len(self.skipped) > max_lines:
      logger.warning("%s: ... and %d more skipped records", self.source,
                     len(self.skipped) - max_lines)


def record_id(record: Any, index: int) -> str:
  """A record's id as a string ('#<index>' when it has none or it is not text)."""
  if isinstance(record, dict) and isinstance(record.get("id"), (str, int)) and \
      not isinstance(record.get("id"), bool) and record.get("id") != "":
    return str(record["id"])
  return f"#{index}"


def check_fields(record: Any) -> RecordCheck | None:
  """A problem with the record's top-level fields, or None."""
  if not isinstance(record, dict):
    return RecordCheck("not_an_object", f"record is a {type(record).__name__}, not an object")
  value = record.get("id")
  if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int))):
    return RecordCheck("bad_field", f"'id' must be a string or integer, got "
                                    f"{type(value).__name__}")
  for field in ("question_type", "answer"):
    value = record.get(field)
    if value is not None and (isinstance(value, bool)
                              or not isinstance(value, (str, int, float))):
      return RecordCheck("bad_field", f"{field!r} must be text, got {type(value).__name__}")
  image = record.get("image")
  # A path (JSON) or the encoded bytes (a TFDS build's decoded record).
  if image not in (None, "") and not isinstance(image, (str, bytes)):
    return RecordCheck("bad_field", f"'image' must be one relative path, got "
                                    f"{type(image).__name__}")
  if "conversations" not in record:
    return RecordCheck("bad_conversation", "no 'conversations' field")
  return None


def check_conversation(record: dict, has_image: bool, length_check: LengthCheck | None,
                       instruction_turns: str = "first") -> RecordCheck:
  """The conversation and length checks of one record."""
  conversations = record.get("conversations")
  prompt_only = length_check is not None and length_check.prompt_only
  position = ("front" if length_check is None else
              conversation_lib.get_template(length_check.template).image_position)
  try:
    if prompt_only:
      turns, _ = conversation_lib.split_for_generation(conversations or [])
      conversation_lib.place_image_marker(conversation_lib.normalize_turns(turns), has_image,
                                          position)
      conversation_lib.normalize_turns(conversations)  # the whole record must be sane
    else:
      turns = conversation_lib.place_image_marker(
          conversation_lib.normalize_turns(conversations), has_image, position)
      if not any(role == "gpt" for role, _ in turns):
        return RecordCheck("no_assistant_turn", "no assistant (gpt) turn")
    if length_check is None:
      return RecordCheck()
    full = conversation_lib.tokenize_full(
        conversations, has_image, length_check.tokenizer, length_check.template,
        prompt_only=prompt_only, instruction_turns=instruction_turns)
  except (conversation_lib.ConversationError, KeyError, TypeError) as e:
    return RecordCheck("bad_conversation", str(e).strip("'\""))
  except Exception as e:  # anything else one record's text raises (e.g. unencodable text)
    return RecordCheck("bad_conversation", f"{type(e).__name__}: {e}")
  supervised = sum(full.loss_mask)
  # The length max_length is compared with (the one that keeps the record whole).
  length = len(full) + conversation_lib.extra_visual_tokens(full, length_check.visual_tokens)
  try:
    cut, truncated = conversation_lib.fit_to_length(
        full, length_check.max_length, length_check.overlong, prompt_only=prompt_only,
        visual_tokens=length_check.visual_tokens)
  except conversation_lib.LengthError as e:
    return RecordCheck("too_long", str(e), length=length, supervised_tokens=supervised,
                       lost_tokens=supervised)
  return RecordCheck(truncated=truncated, length=length,
                     lost_tokens=supervised - sum(cut.loss_mask),
                     supervised_tokens=supervised)


def check_record(record: Any, image_of: Callable[[dict], Any], *,
                 length_check: LengthCheck | None, image_check: str,
                 max_image_pixels: int, instruction_turns: str = "first",
                 image_limits: images_lib.ImageLimits | None = None) -> RecordCheck:
  """Every check of one record. `image_of(record)` gives its image (a path or encoded
  bytes) or None for a text-only record. image_limits defaults to
  ImageLimits(max_image_pixels)."""
  problem = check_fields(record)
  if problem is not None:
    return problem
  image = image_of(record)
  result = check_conversation(record, image is not None, length_check, instruction_turns)
  if result.kind == "kept" and image is not None and image_check:
    found = images_lib.image_problem(image, image_check, max_image_pixels, image_limits)
    if found is not None:
      return RecordCheck(found[0], found[1], length=result.length,
                         supervised_tokens=result.supervised_tokens, has_image=True)
  return dataclasses.replace(result, has_image=image is not None)


def _default_gather(shard: tuple[int, int]) -> Callable[[np.ndarray], np.ndarray] | None:
  """jax's all-gather when the runtime really has `shard[1]` processes, else None."""
  if shard[1] == 1:
    return None
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() != shard[1]:
    return None
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return lambda local: np.asarray(multihost_utils.process_allgather(local, tiled=False))


def validate(records: Sequence[Any], source_name: str, image_of: Callable[[dict], Any], *,
             length_check: LengthCheck | None = None, strict: bool = False,
             image_check: str = "verify",
             max_image_pixels: int = images_lib.MAX_IMAGE_PIXELS,
             instruction_turns: str = "first", num_threads: int = 8,
             shard: tuple[int, int] = (0, 1),
             gather: Callable[[np.ndarray], np.ndarray] | None = None,
             image_limits: images_lib.ImageLimits | None = None,
             ) -> tuple[list[int], ValidationReport]:
  """(indices of usable records, report); see the module docstring.

  shard=(p, P) checks records p, p+P, ... here and `gather(local)` — local an int32
  [ceil(N/P), 6] status table, padded with -1 rows — must return the [P, ceil(N/P), 6]
  tables of every process. gather=None uses jax's all-gather when the jax runtime has P
  processes and otherwise checks every record here.
  """
  process, count = shard
  if gather is None:
    gather = _default_gather(shard)
    if gather is None:
      process, count = 0, 1
  num = len(records)
  mine = range(process, num, count)
  checks: dict[int, RecordCheck] = {}

  def check(index: int) -> RecordCheck:
    return check_record(records[index], image_of, length_check=length_check,
                        image_check=image_check, max_image_pixels=max_image_pixels,
                        instruction_turns=instruction_turns, image_limits=image_limits)

  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
    for start in range(0, len(mine), _CHUNK):
      indices = mine[start:start + _CHUNK]
      for index, result in zip(indices, pool.map(check, indices)):
        checks[index] = result
      if strict and count == 1 and any(checks[i].kind != "kept" for i in indices):
        break  # one process: stop at the first bad chunk

  if count > 1:
    per_process = -(-num // count)
    local = np.full((per_process, _STATUS_FIELDS), -1, np.int32)
    for position, index in enumerate(mine):
      local[position] = checks[index].row()
    table = np.asarray(gather(local)).reshape(count, per_process, _STATUS_FIELDS)
    for other in range(count):
      if other == process:
        continue
      for position, index in enumerate(range(other, num, count)):
        kind, truncated, length, lost, supervised, image = (
            int(v) for v in table[other, position])
        checks[index] = RecordCheck(
            REASON_KINDS[kind],
            "" if kind == 0 else f"{REASON_KINDS[kind]} (checked by process {other})",
            bool(truncated), length, lost, supervised, bool(image))

  report = ValidationReport(source=source_name, num_records=num, num_checked=len(mine),
                            max_length=None if length_check is None
                            else length_check.max_length)
  counts = collections.Counter()
  kept = []
  for index in range(num):
    if index not in checks:  # strict stopped before this chunk
      break
    result = checks[index]
    report.length_needed = max(report.length_needed, result.length)
    rid = record_id(records[index], index)
    if result.kind != "kept":
      if strict:
        raise InvalidRecordError(
            f"{source_name}: record {rid!r} (#{index}): {result.reason} (strict=True; set "
            "data.strict=False to skip bad records)")
      counts[result.kind] += 1
      report.skipped.append((rid, result.reason))
      continue
    report.supervised_tokens += result.supervised_tokens
    report.lost_tokens += result.lost_tokens
    if result.truncated:
      report.truncated.append(rid)
    kept.append(index)
    report.kept_lengths.append(result.length)
    report.kept_images.append(result.has_image)
  report.reason_counts = dict(counts)
  report.log()
  if length_check is not None:
    enforce_length_policy(report, length_check)
  return kept, report


def enforce_length_policy(report: ValidationReport, length_check: LengthCheck) -> None:
  """Raises TruncationError when more than max_truncated_fraction of the records would be
  cut by max_length, unless allow_truncation. The message names the fields to change."""
  if length_check.allow_truncation or not report.num_records:
    return
  fraction = report.num_cut / report.num_records
  if fraction <= length_check.max_truncated_fraction:
    return
  raise TruncationError(
      f"{report.source}: {report.num_cut} of {report.num_records} records "
      f"({100 * fraction:.1f}%) do not fit data.max_length={length_check.max_length} "
      f"({len(report.truncated)} truncated, losing {report.lost_tokens} of "
      f"{report.supervised_tokens} supervised answer tokens; "
      f"{report.reason_counts.get('too_long', 0)} skipped as too long). "
      f"data.max_length={report.length_needed} keeps every record whole: set "
      f"--config.data.max_length={report.length_needed}, or set "
      f"--config.data.allow_truncation=True to train on the cut rows (the limit is "
      f"data.max_truncated_fraction={length_check.max_truncated_fraction}).")
