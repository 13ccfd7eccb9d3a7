"""Reading benchmark files: JSON / JSONL / TSV question files, parquet and arrow exports,
embedded and on-disk images, and the errors that name what cannot be read."""

import csv
import glob
import io
import json
import os
import sys
from typing import Any, Iterator, Sequence

from PIL import Image

from leo_mini_jax.data import images as images_lib


class BenchmarkError(ValueError):
  """A benchmark's files or records cannot be used (the message names them)."""


class MissingFile(BenchmarkError):
  """A file of the LLaVA layout is absent (reported with every layout looked for)."""


def export_shards(root: str, split: str = "") -> list[str]:
  """The data files of an lmms-lab export under `root`: *.parquet (hub download) or the
  *.arrow files `save_to_disk` writes (beside a dataset_info.json). When the files name
  several splits, those of `split` (a path part equal to it, or a file name starting
  with 'split-', 'split_' or 'split.')."""
  found = sorted(glob.glob(os.path.join(root, "**", "*.parquet"), recursive=True))
  arrow = [p for p in sorted(glob.glob(os.path.join(root, "**", "*.arrow"), recursive=True))
           if os.path.exists(os.path.join(os.path.dirname(p), "dataset_info.json"))]
  found += arrow
  if not split or not found:
    return found

  def in_split(path: str) -> bool:
    parts = os.path.relpath(path, root).split(os.sep)
    name = parts[-1]
    return split in parts[:-1] or any(name.startswith(split + c) for c in "-_.")
  chosen = [p for p in found if in_split(p)]
  return chosen or found


def _record_batches(path: str):
  """Record batches of a parquet file, or of an Arrow IPC file (`save_to_disk` writes the
  stream format; the file format is read too)."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  try:
    if path.endswith(".parquet"):
      return pq.ParquetFile(path).iter_batches(batch_size=64)
    try:
      return iter(pa.ipc.open_stream(pa.memory_map(path)))
    except pa.ArrowInvalid:
      reader = pa.ipc.open_file(pa.memory_map(path))
      return (reader.get_batch(i) for i in range(reader.num_record_batches))
  except Exception as e:  # pyarrow raises several types for corrupt files
    raise BenchmarkError(f"cannot read {path}: {e}") from None


def iter_parquet(paths: Sequence[str]) -> Iterator[tuple[str, int, dict]]:
  """(file, row index, row) of parquet / arrow shards, one record batch at a time."""
  for path in paths:
    index = 0
    for batch in _record_batches(path):
      for row in batch.to_pylist():
        yield path, index, row
        index += 1


def load_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise MissingFile(f"file not found: {path}") from None
  except json.JSONDecodeError as e:
    raise BenchmarkError(f"{path}: not valid JSON: {e}") from None


class BadLine(dict):
  """A JSONL line that is not a JSON object: reading any field raises, so the record is
  reported (or, with skip_bad, skipped and counted) like any other bad record."""

  def __init__(self, number: int, reason: str):
    super().__init__()
    self.number, self.reason = number, reason

  def get(self, key, default=None):
    del key, default
    return f"line {self.number}"

  def __getitem__(self, key):
    raise BenchmarkError(f"line {self.number} is not a valid JSON record: {self.reason}")


def load_jsonl(path: str, lenient: bool = False) -> list[dict]:
  """The records of a JSONL file. A malformed line raises, or with `lenient` becomes a
  `BadLine` in its place (question files: one bad line is one bad record)."""
  records = []
  try:
    with open(path) as f:
      for number, line in enumerate(f, 1):
        if line.strip():
          try:
            record = json.loads(line)
            if not isinstance(record, dict):
              raise json.JSONDecodeError("not an object", line, 0)
          except json.JSONDecodeError as e:
            if not lenient:
              raise BenchmarkError(f"{path}: line {number} is not valid JSON: {e}") from None
            record = BadLine(number, str(e))
          records.append(record)
  except FileNotFoundError:
    raise MissingFile(f"file not found: {path}") from None
  return records


def load_records(path: str) -> list[dict]:
  """A .jsonl, .json (list, or {'data': list}) or .tsv question file as dicts (a bad
  JSONL line is a `BadLine` record)."""
  if path.endswith(".jsonl"):
    return load_jsonl(path, lenient=True)
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
