"""Reading .safetensors files tensor by tensor, with their headers checked first.

bfloat16 and float8 tensors come back as `ml_dtypes` arrays: safetensors' numpy path
has no such dtypes, so their bytes are read straight from the file at the offsets in its
header.

Checkpoints are untrusted input. A safetensors header is checked against the file before
any tensor is read: every tensor's dtype is known, its shape is a list of non-negative
integers, its byte range lies inside the data section, matches shape × dtype size
exactly, and overlaps no other tensor; an error names the tensor and the file.
"""

import json
import math
import os
import struct
from typing import Mapping, Sequence

import ml_dtypes
import numpy as np

from leo_mini_jax.porting.checkpoint_reader import CheckpointReader

# safetensors dtype names → numpy dtypes (ml_dtypes for those numpy lacks).
SAFETENSORS_DTYPES: Mapping[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
# Dtypes safetensors' numpy backend cannot build; read from raw bytes instead.
_RAW_DTYPES = ("BF16", "F8_E4M3", "F8_E5M2")


def _safetensors_header(path: str) -> tuple[dict, int]:
  """(header dict, byte offset where tensor data starts) of a .safetensors file, after
  checking every entry against the file (see the module docstring)."""
  file_size = os.path.getsize(path)
  with open(path, "rb") as f:
    prefix = f.read(8)
    if len(prefix) != 8:
      raise ValueError(f"{path}: not a safetensors file (shorter than its header length)")
    (length,) = struct.unpack("<Q", prefix)
    if 8 + length > file_size:
      raise ValueError(f"{path}: header length {length} runs past the end of the file "
                       f"({file_size} bytes): truncated or not a safetensors file")
    try:
      header = json.loads(f.read(length))
    except (ValueError, UnicodeDecodeError) as e:
      raise ValueError(f"{path}: not a safetensors file ({e})") from None
  if not isinstance(header, dict):
    raise ValueError(f"{path}: not a safetensors file (header is not a JSON object)")
  header.pop("__metadata__", None)
  _check_header(path, header, file_size - 8 - length)
  return header, 8 + length


def _check_header(path: str, header: dict, data_size: int) -> None:
  """Every entry's dtype, shape and byte range is consistent with the file."""
  ranges = []
  for key, entry in header.items():
    where = f"{path}: tensor {key!r}"
    if not isinstance(entry, dict):
      raise ValueError(f"{where}: header entry is not an object")
    if entry.get("dtype") not in SAFETENSORS_DTYPES:
      raise ValueError(f"{where} has unsupported dtype {entry.get('dtype')!r}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
      raise ValueError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(
        isinstance(n, int) and not isinstance(n, bool) for n in offsets)):
      raise ValueError(f"{where}: data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
      raise ValueError(f"{where}: data_offsets [{begin}, {end}] lie outside the data "
                       f"section of {data_size} bytes (truncated file or a lying header)")
    want = math.prod(shape) * SAFETENSORS_DTYPES[entry["dtype"]].itemsize
    if end - begin != want:
      raise ValueError(f"{where}: {end - begin} bytes at data_offsets [{begin}, {end}] but "
                       f"shape {shape} of {entry['dtype']} needs {want}")
    ranges.append((begin, end, key))
  ranges.sort()
  for (_, end_a, key_a), (begin_b, end_b, key_b) in zip(ranges, ranges[1:]):
    if begin_b < end_a and begin_b < end_b:
      raise ValueError(f"{path}: tensor {key_b!r} overlaps tensor {key_a!r} "
                       f"(bytes from {begin_b} before {end_a})")


class SafetensorsReader(CheckpointReader):
  """One or more .safetensors files read with `safe_open(framework="np")`.

  Args:
    files: the .safetensors files; a key may live in only one of them.
    weight_map: optional key → file name (from an index.json); checked against the files.
  """

  def __init__(self, files: Sequence[str], weight_map: Mapping[str, str] | None = None):
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    self._safe_open = safe_open
    self.files = tuple(files)
    self._entries: dict[str, tuple[str, dict]] = {}  # key → (file, header entry)
    self._data_start: dict[str, int] = {}
    for file in self.files:
      header, start = _safetensors_header(file)
      self._data_start[file] = start
      for key, entry in header.items():
        if key in self._entries:
          raise ValueError(
              f"tensor {key!r} appears in two files: {self._entries[key][0]} and {file}")
        self._entries[key] = (file, entry)
    if weight_map is not None:
      by_name = {os.path.basename(f): f for f in self.files}
      wrong = [k for k, name in weight_map.items()
               if k not in self._entries or by_name.get(name) != self._entries[k][0]]
      if wrong:
        raise ValueError(
            f"index weight_map disagrees with the shard files for {len(wrong)} tensor(s), "
            f"e.g. {sorted(wrong)[:5]}")

  def keys(self) -> list[str]:
    return list(self._entries)

  def __contains__(self, key: str) -> bool:
    return key in self._entries

  def shape(self, key: str) -> tuple[int, ...]:
    if key not in self._entries:
      raise self._missing(key)
    return tuple(self._entries[key][1]["shape"])

  def dtype(self, key: str) -> np.dtype:
    if key not in self._entries:
      raise self._missing(key)
    return SAFETENSORS_DTYPES[self._entries[key][1]["dtype"]]

  def get(self, key: str) -> np.ndarray:
    if key not in self._entries:
      raise self._missing(key)
    file, entry = self._entries[key]
    if entry["dtype"] in _RAW_DTYPES:
      return self._read_raw(file, entry)
    # Opened per tensor: safe_open memory-maps the file, and pages read through a handle
    # kept open stay resident, which would hold a second copy of the weights by the end.
    with self._safe_open(file, framework="np") as handle:
      return handle.get_tensor(key)

  def _read_raw(self, file: str, entry: dict) -> np.ndarray:
    begin, end = entry["data_offsets"]
    buffer = bytearray(end - begin)  # writable, unlike bytes
    with open(file, "rb") as f:
      f.seek(self._data_start[file] + begin)
      if f.readinto(buffer) != len(buffer):
        raise ValueError(f"{file}: truncated tensor data")
    dtype = SAFETENSORS_DTYPES[entry["dtype"]].newbyteorder("<")
    return np.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])
