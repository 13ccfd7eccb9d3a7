"""What every benchmark module shares: samples, the registry, and the on-disk readers.

A benchmark module defines one `Benchmark` subclass and registers it. The subclass says
where its files are (`folders`, `llava_files`), how a record becomes a `Sample` (prompt
text with the benchmark's suffix, image, scoring target), and how predictions are scored.
Two layouts are read:

  llava    LLaVA's eval folders (playground/data/eval/NAME): a question .jsonl / .json /
           .tsv, an image folder and annotation files, as each module lists them.
  parquet  an lmms-lab Hugging Face dataset saved locally: *.parquet shards anywhere under
           the folder (a hub download), or the *.arrow files + dataset_info.json that
           `datasets`' save_to_disk writes; images embedded as {'bytes', 'path'} structs.
           Where the export holds several splits (file names or folders like
           'validation-0000.parquet', 'test/data-0000.arrow'), the benchmark's split is read.

A missing file names every layout looked for; a malformed record (a JSONL line that is
not JSON included) raises `BenchmarkError` naming the benchmark, the file and the record;
with skip_bad the record is skipped and counted in `ReadReport`.

Each class says how many tokens its answers may take (`max_new_tokens`: the value of the
lmms-eval task the paper's numbers come from; eval.max_new_tokens > 0 overrides it) and
where it stands in the paper's tables (`column`; None: offered but not in the tables).
"""

import dataclasses
import glob
import json
import os
from typing import Any, Callable, Iterable, Iterator, Sequence

# The readers and errors, used by every benchmark module as base.<name>.
from leo_mini_jax.evaluation.benchmarks.files import (  # noqa: F401  pylint: disable=unused-import
    BadLine, BenchmarkError, MissingFile, check_image, export_shards, image_value,
    iter_parquet, load_json, load_jsonl, load_records)

SINGLE_WORD = "Answer the question using a single word or phrase."
OPTION_LETTER = "Answer with the option's letter from the given choices directly."

# lmms-eval's generation default when a task sets no max_new_tokens (its model classes
# `setdefault` 1024).
HARNESS_DEFAULT_LENGTH = 1024


@dataclasses.dataclass
class Sample:
  """One question to generate for.

  id: unique within the benchmark. prompt: the user message; the template puts the image
  marker in front of it unless the prompt places `<image>` itself (MMMU). image: a file path, encoded bytes, or None. target: JSON-serialisable
  data the scorer needs (references, category, ...); `target['answers']` absent means the
  question has no public reference (a hidden test split, for the submission file only).
  """
  id: str
  prompt: str
  image: Any
  target: dict
  source: str = ""  # the file the record came from, for error messages


@dataclasses.dataclass
class ReadReport:
  benchmark: str
  num_samples: int = 0
  skipped: list = dataclasses.field(default_factory=list)  # (file, record, reason)

  def summary(self) -> str:
    text = f"{self.benchmark}: {self.num_samples} questions"
    if self.skipped:
      text += f", {len(self.skipped)} bad records skipped (first: {self.skipped[0]})"
    return text


class Benchmark:
  """Base class; subclasses set the class attributes and implement the hooks."""
  name: str = ""          # registry key and output folder (lower case)
  title: str = ""         # column header of the summary table
  folders: tuple[str, ...] = ()  # sub-folders of data_dir tried in order (default:
                                 # title, name)
  suffix: str = SINGLE_WORD
  headline_key: str = "score"    # metrics key shown in the summary table
  max_new_tokens: int = 16       # the lmms-eval task's generation length
  column: int | None = None      # position in the paper's tables (Table 3)
  default_split: str = ""        # the split an lmms-lab export is read for
  llava_files: str = ""          # the LLaVA-layout files, for the missing-file message

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    if "folders" not in cls.__dict__:  # LLaVA's eval folders are named as the title
      cls.folders = (cls.title, cls.name)

  def __init__(self, root: str, skip_bad: bool = False, split: str = ""):
    self.root, self.skip_bad, self.split = root, skip_bad, split
    self.report = ReadReport(self.title or self.name)

  # --------------------------------------------------------------- hooks to implement

  def llava_records(self) -> Iterator[tuple[str, str, Callable[[], Sample | list]]]:
    """LLaVA layout: yields (file, record id, build) where build() makes the Sample(s)."""
    raise BenchmarkError(f"{self.title}: no LLaVA-layout reader; use the parquet layout")

  def parquet_sample(self, row: dict) -> Sample | list[Sample] | None:
    """Parquet layout: one row → Sample(s), or None to leave the row out (other split)."""
    raise NotImplementedError

  def score(self, records: list[dict]) -> dict[str, Any]:
    """Metrics from prediction records {'id', 'prediction', 'target'} (scored ones)."""
    raise NotImplementedError

  def write_submission(self, records: list[dict], out_dir: str) -> list[str]:
    """Files the official server takes (benchmarks with a hidden test split)."""
    del records, out_dir
    return []

  # ------------------------------------------------------------------------ reading

  def where(self, *parts: str) -> str:
    return os.path.join(self.root, *parts)

  def keep_shard(self, path: str) -> bool:
    """Whether an export file belongs to this benchmark (MMBench: its language)."""
    del path
    return True

  @classmethod
  def detect(cls, folder: str) -> bool:
    """Whether `folder` holds this benchmark ('all' skips folders that do not)."""
    del folder
    return True

  def require(self, *parts: str) -> str:
    path = self.where(*parts)
    if not os.path.exists(path):
      raise MissingFile(f"{self.title}: file not found: {path}")
    return path

  def first_existing(self, candidates: Sequence[str],
                     exclude: Callable[[str], bool] | None = None) -> str:
    for candidate in candidates:
      matches = sorted(m for m in glob.glob(self.where(candidate))
                       if exclude is None or not exclude(os.path.basename(m)))
      if matches:
        return matches[0]
    raise MissingFile(f"{self.title}: none of {list(candidates)} found under {self.root}")

  def samples(self) -> list[Sample]:
    """Every usable sample, images checked; bad records raise or (skip_bad) are counted."""
    shards = [s for s in export_shards(self.root, self.split or self.default_split)
              if self.keep_shard(s)]
    items = self._parquet_items(shards) if shards else self._llava_items()
    out, seen = [], set()
    for source, record_id, build in items:
      try:
        built = build()
        built = [] if built is None else (built if isinstance(built, list) else [built])
        for sample in built:
          sample.source = sample.source or source
          if sample.id in seen:
            raise BenchmarkError(f"duplicate question id {sample.id!r}")
          check_image(sample.image)
        seen.update(s.id for s in built)
        out += built
      except (BenchmarkError, KeyError, ValueError, TypeError, IndexError, OSError) as e:
        reason = f"{type(e).__name__}: {e}" if not isinstance(e, BenchmarkError) else str(e)
        if not self.skip_bad:
          raise BenchmarkError(f"{self.title}: {source}: record {record_id}: {reason} "
                               "(eval.skip_bad=True skips bad records)") from None
        self.report.skipped.append((source, record_id, reason))
    if not out:
      raise BenchmarkError(f"{self.title}: no usable questions under {self.root}")
    self.report.num_samples = len(out)
    return out

  def _llava_items(self):
    """The LLaVA reader's items; a missing file names every layout looked for."""
    items = self.llava_records()
    while True:
      try:
        item = next(items)
      except StopIteration:
        return
      except MissingFile as e:
        raise MissingFile(
            f"{e}\n  looked for: the LLaVA layout ({self.llava_files or 'see its module'}) "
            f"and an lmms-lab export (*.parquet, or *.arrow + dataset_info.json from "
            f"save_to_disk) under {self.root}") from None
      yield item

  def _parquet_items(self, shards: Sequence[str]):
    for path, index, row in iter_parquet(shards):
      yield path, f"#{index}", lambda row=row: self.parquet_sample(row)


def with_suffix(question: str, suffix: str) -> str:
  """The question with the benchmark's instruction appended once (LLaVA's question files
  already carry it)."""
  question = question.strip()
  if not suffix or suffix in question:
    return question
  return question + "\n" + suffix


def options_block(options: Sequence[str]) -> str:
  """'A. first\\nB. second...' as LLaVA / lmms-eval lay out choices."""
  return "\n".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(options))


def accuracy_by(records: Iterable[dict], correct: Callable[[dict], bool],
                key: Callable[[dict], str] | None = None) -> dict[str, Any]:
  """{'score': overall %, 'by_<group>': {group: %}, 'num_questions'}."""
  records = list(records)
  return _mean_percent(records, [float(bool(correct(r))) for r in records], key)


def _mean_percent(records: Sequence[dict], values: Sequence[float],
                  key: Callable[[dict], str] | None) -> dict[str, Any]:
  """{'score': mean of per-question values in %, 'num_questions'[, 'by_category']}."""
  out: dict[str, Any] = {"score": 100.0 * sum(values) / max(len(values), 1),
                         "num_questions": len(values)}
  if key is not None:
    groups: dict[str, list[float]] = {}
    for r, v in zip(records, values):
      groups.setdefault(str(key(r)), []).append(v)
    out["by_category"] = {g: 100.0 * sum(v) / len(v) for g, v in sorted(groups.items())}
  return out


REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
  REGISTRY[cls.name] = cls
  return cls


def choice_sample(sample_id: str, question: str, options: Sequence[str], answer: int,
                  image: Any, hint: str = "", category: str = "", **extra) -> Sample:
  """A multiple-choice question: (hint,) question, lettered options, the letter suffix."""
  options = [str(o) for o in options]
  if not options:
    raise ValueError("no options")
  if not 0 <= answer < len(options):
    raise ValueError(f"answer index {answer} outside the {len(options)} options")
  text = (f"{hint.strip()}\n" if hint and hint.strip() else "") + question.strip()
  prompt = text + "\n" + options_block(options) + "\n" + OPTION_LETTER
  return Sample(id=str(sample_id), prompt=prompt, image=image,
                target={"answers": [chr(65 + answer)], "options": options,
                        "category": category, **extra})


def letter_index(value: Any, num_options: int) -> int:
  """An answer given as a letter ('B') or an index (1, '1') → index."""
  text = str(value).strip()
  if len(text) == 1 and text.isalpha():
    index = ord(text.upper()) - 65
  else:
    index = int(text)
  if not 0 <= index < num_options:
    raise ValueError(f"answer {value!r} outside the {num_options} options")
  return index


def score_vqa(records: Sequence[dict], measure: Callable[[str, list], float],
              key: Callable[[dict], str] | None = None) -> dict[str, Any]:
  """Mean of a per-question soft score (VQA accuracy, ANLS) in %, optionally by group."""
  values = [measure(r["prediction"], r["target"]["answers"]) for r in records]
  return _mean_percent(records, values, key)


def write_xlsx(path: str, rows: Sequence[dict], header: Sequence[str] = ()) -> None:
  """One sheet: `header` (default: every key, first-seen order), then one row per dict
  (absent keys empty); values keep their type (numbers are number cells, as the MMBench
  server reads `index`). Control characters, which a worksheet cannot hold (a model's
  answer may have them), are dropped from text."""
  import openpyxl  # pylint: disable=g-import-not-at-top
  from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE  # pylint: disable=g-import-not-at-top
  clean = lambda v: ILLEGAL_CHARACTERS_RE.sub("", v) if isinstance(v, str) else v
  header = list(header) or list(dict.fromkeys(k for row in rows for k in row))
  book = openpyxl.Workbook()
  sheet = book.active
  sheet.append(header)
  for row in rows:
    sheet.append([clean(row.get(k)) for k in header])
  book.save(path)


def write_json_submission(path: str, rows: list[dict]) -> list[str]:
  if not rows:
    return []
  with open(path, "w") as f:
    json.dump(rows, f)
  return [path]
