"""What every benchmark module shares: samples, the registry, and the on-disk readers.

A benchmark module defines one `Benchmark` subclass and registers it. The subclass says
where its files are (`folders`, `llava_files`), how a record becomes a `Sample` (prompt
text with the benchmark's suffix, image, scoring target), and how predictions are scored.
Two layouts are read:

  llava    LLaVA's eval folders (playground/data/eval/NAME): a question .jsonl / .json /
           .tsv, an image folder and annotation files, as each module lists them.
  parquet  an lmms-lab Hugging Face dataset saved locally: *.parquet shards anywhere under
           the folder, images embedded as {'bytes', 'path'} structs.

A missing file or a malformed record raises `BenchmarkError` naming the benchmark, the
file and the record; with skip_bad the record is skipped and counted in `ReadReport`.
"""

import csv
import dataclasses
import glob
import io
import json
import os
import sys
from typing import Any, Callable, Iterable, Iterator, Sequence

from PIL import Image

from leo_mini_jax.data import images as images_lib

SINGLE_WORD = "Answer the question using a single word or phrase."
OPTION_LETTER = "Answer with the option's letter from the given choices directly."


class BenchmarkError(ValueError):
  """A benchmark's files or records cannot be used (the message names them)."""


@dataclasses.dataclass
class Sample:
  """One question to generate for.

  id: unique within the benchmark. prompt: the user message (no image marker; the
  template adds it). image: a file path, encoded bytes, or None. target: JSON-serialisable
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
  folders: tuple[str, ...] = ()  # sub-folders of data_dir tried in order
  suffix: str = SINGLE_WORD
  headline_key: str = "score"    # metrics key shown in the summary table

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

  def require(self, *parts: str) -> str:
    path = self.where(*parts)
    if not os.path.exists(path):
      raise BenchmarkError(f"{self.title}: file not found: {path}")
    return path

  def first_existing(self, candidates: Sequence[str]) -> str:
    for candidate in candidates:
      matches = sorted(glob.glob(self.where(candidate)))
      if matches:
        return matches[0]
    raise BenchmarkError(f"{self.title}: none of {list(candidates)} found under {self.root}")

  def samples(self) -> list[Sample]:
    """Every usable sample, images checked; bad records raise or (skip_bad) are counted."""
    shards = sorted(glob.glob(os.path.join(self.root, "**", "*.parquet"), recursive=True))
    items = self._parquet_items(shards) if shards else self.llava_records()
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

  def _parquet_items(self, shards: Sequence[str]):
    for path, index, row in iter_parquet(shards):
      yield path, f"#{index}", lambda row=row: self.parquet_sample(row)


# --------------------------------------------------------------------------- readers


def iter_parquet(paths: Sequence[str]) -> Iterator[tuple[str, int, dict]]:
  """(file, row index, row) of parquet shards, one record batch at a time."""
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  for path in paths:
    try:
      shard = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
      raise BenchmarkError(f"cannot read parquet file {path}: {e}") from None
    index = 0
    for batch in shard.iter_batches(batch_size=64):
      for row in batch.to_pylist():
        yield path, index, row
        index += 1


def load_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise BenchmarkError(f"file not found: {path}") from None
  except json.JSONDecodeError as e:
    raise BenchmarkError(f"{path}: not valid JSON: {e}") from None


def load_jsonl(path: str) -> list[dict]:
  records = []
  try:
    with open(path) as f:
      for number, line in enumerate(f, 1):
        if line.strip():
          try:
            records.append(json.loads(line))
          except json.JSONDecodeError as e:
            raise BenchmarkError(f"{path}: line {number} is not valid JSON: {e}") from None
  except FileNotFoundError:
    raise BenchmarkError(f"file not found: {path}") from None
  return records


def load_records(path: str) -> list[dict]:
  """A .jsonl, .json (list, or {'data': list}) or .tsv question file as dicts."""
  if path.endswith(".jsonl"):
    return load_jsonl(path)
  if path.endswith(".tsv"):
    csv.field_size_limit(sys.maxsize)  # base64 images in MMBench's TSV
    with open(path, newline="") as f:
      return list(csv.DictReader(f, delimiter="\t"))
  data = load_json(path)
  if isinstance(data, dict) and isinstance(data.get("data"), list):
    data = data["data"]
  if not isinstance(data, list):
    raise BenchmarkError(f"{path}: expected a list of records")
  return data


def image_value(value: Any) -> Any:
  """A parquet image cell ({'bytes', 'path'} struct, bytes, or a list of them) → bytes."""
  if isinstance(value, list):
    if not value:
      raise ValueError("empty image list")
    value = value[0]
  if isinstance(value, dict):
    value = value.get("bytes")
  if not isinstance(value, (bytes, bytearray)) or not value:
    raise ValueError("no image bytes")
  return bytes(value)


def check_image(image: Any) -> None:
  """Raises OSError naming the problem when an image file or image bytes are unusable."""
  if image is None:
    return
  try:
    if isinstance(image, (bytes, bytearray)):
      with Image.open(io.BytesIO(image)) as im:
        im.verify()
    else:
      # The training data's reader: a regular file of at most data.max_image_bytes' default
      # (a FIFO or a link to /dev/zero is refused, not read).
      data = images_lib.read_image_file(image, images_lib.ImageLimits())
      with Image.open(io.BytesIO(data)) as im:
        im.verify()
  except FileNotFoundError:
    raise OSError(f"image file not found: {image}") from None
  except OSError:
    raise
  except Exception as e:  # PIL raises several types for corrupt data
    raise OSError(f"unreadable image: {type(e).__name__}: {e}") from None


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
  hits = [bool(correct(r)) for r in records]
  out: dict[str, Any] = {"score": 100.0 * sum(hits) / max(len(hits), 1),
                         "num_questions": len(hits)}
  if key is not None:
    groups: dict[str, list[bool]] = {}
    for r, hit in zip(records, hits):
      groups.setdefault(str(key(r)), []).append(hit)
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


def choice_correct(record: dict) -> bool:
  """The prediction's option letter (scoring.extract_choice) is the reference's."""
  from leo_mini_jax.evaluation import scoring  # pylint: disable=g-import-not-at-top
  target = record["target"]
  letter = scoring.extract_choice(record["prediction"], len(target["options"]),
                                  target["options"])
  return letter == target["answers"][0]


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
  out: dict[str, Any] = {"score": 100.0 * sum(values) / max(len(values), 1),
                         "num_questions": len(values)}
  if key is not None:
    groups: dict[str, list[float]] = {}
    for r, v in zip(records, values):
      groups.setdefault(str(key(r)), []).append(v)
    out["by_category"] = {g: 100.0 * sum(v) / len(v) for g, v in sorted(groups.items())}
  return out


def write_json_submission(path: str, rows: list[dict]) -> list[str]:
  if not rows:
    return []
  with open(path, "w") as f:
    json.dump(rows, f)
  return [path]
