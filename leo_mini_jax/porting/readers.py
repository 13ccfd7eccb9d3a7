"""Reading PyTorch checkpoints tensor by tensor, as numpy arrays.

`open_checkpoint(path)` accepts

  * a directory holding `model.safetensors`, sharded safetensors with
    `model.safetensors.index.json`, any other single `*.safetensors` file, or
    `pytorch_model.bin` (optionally sharded with `pytorch_model.bin.index.json`) / `*.pt` / `*.pth`;
  * a single `.safetensors`, `.bin`, `.pt`, `.pth` or `.ckpt` file, or an `*.index.json` file.

and returns a `CheckpointReader` with `keys()`, `shape(key)`, `dtype(key)` and `get(key)`.
Nothing is read until `get` is called, and `get` reads one tensor, so a converter that
processes tensors one at a time holds at most one source tensor beside its output.

bfloat16 and float8 tensors come back as `ml_dtypes` arrays: safetensors' numpy path
has no such dtypes, so their bytes are read straight from the file at the offsets in its
header. `.bin`/`.pt` files are read only through `torch.load(weights_only=True)` (never a
plain pickle), and only when torch is installed.

Checkpoints are untrusted input. A pickle that needs code execution to load (anything
beyond tensors and plain containers) is refused, with a message saying to convert it to
safetensors; it is never retried with weights_only=False. A safetensors header is
checked against the file before any tensor is read: every tensor's dtype is known, its
shape is a list of non-negative integers, its byte range lies inside the data section,
matches shape × dtype size exactly, and overlaps no other tensor; an error names the
tensor and the file.
"""

import json
import math
import os
import pickle
import struct
from typing import Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np

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

TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class CheckpointReader:
  """A read-only, lazily loaded mapping from tensor name to numpy array."""

  files: tuple[str, ...] = ()

  def keys(self) -> list[str]:
    """Tensor names, grouped by file (so reading them in order reads one file at a time)."""
    raise NotImplementedError

  def shape(self, key: str) -> tuple[int, ...]:
    raise NotImplementedError

  def dtype(self, key: str) -> np.dtype:
    raise NotImplementedError

  def get(self, key: str) -> np.ndarray:
    """Reads one tensor from disk."""
    raise NotImplementedError

  def close(self) -> None:
    pass

  def __contains__(self, key: str) -> bool:
    return key in set(self.keys())

  def __iter__(self) -> Iterator[str]:
    return iter(self.keys())

  def __len__(self) -> int:
    return len(self.keys())

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __repr__(self) -> str:
    return f"{type(self).__name__}({', '.join(self.files)})"

  def _missing(self, key: str) -> KeyError:
    return KeyError(f"tensor {key!r} is not in checkpoint {', '.join(self.files)}")


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



def _torch_to_numpy(tensor) -> np.ndarray:
  import torch  # pylint: disable=import-outside-toplevel
  tensor = tensor.detach().cpu()
  raw = {torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
         torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
         torch.float8_e5m2: (torch.uint8, ml_dtypes.float8_e5m2)}
  if tensor.dtype in raw:
    int_dtype, np_dtype = raw[tensor.dtype]
    return tensor.contiguous().view(int_dtype).numpy().view(np_dtype)
  return tensor.numpy()


# Where a training checkpoint keeps its weights, first found wins (TorchReader's default).
STATE_KEYS = ("state_dict", "model", "module")


def _torch_state_dict(obj, file: str, state_keys: Sequence[str] = STATE_KEYS) -> dict:
  """The tensor dict inside what torch.load returned (plain, or under one of `state_keys`)."""
  import torch  # pylint: disable=import-outside-toplevel
  for _ in range(3):
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
      return dict(obj)
    if isinstance(obj, Mapping):
      inner = [obj[k] for k in state_keys if isinstance(obj.get(k), Mapping)]
      if inner:
        obj = inner[0]
        continue
    break
  if isinstance(obj, Mapping):
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if tensors:
      return tensors
  raise ValueError(f"{file}: no tensor dictionary found (top-level type {type(obj).__name__})")


def _refused(file: str, error: Exception) -> ValueError:
  """The error for a pickle that weights_only loading refuses (it needs code execution)."""
  first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  return ValueError(
      f"{file}: refused: this pickle needs code execution to load (torch.load with "
      f"weights_only=True rejected it: {first_line}). It will not be loaded with "
      "weights_only=False: convert it to .safetensors where you trust it (e.g. "
      "`safetensors.torch.save_file(torch.load(path, weights_only=False), "
      "'model.safetensors')`) and point the converter at that file.")


class TorchReader(CheckpointReader):
  """PyTorch `.bin`/`.pt` files, loaded with `torch.load(weights_only=True)`.

  Files are loaded one at a time (memory-mapped where the format allows) and only the
  file holding the requested key is kept, so reading keys in `keys()` order holds one
  shard at a time. `state_keys`: where in a training checkpoint the weights are looked
  for, first found wins (e.g. ('ema_state', 'model') to prefer EMA weights).
  """

  def __init__(self, files: Sequence[str], weight_map: Mapping[str, str] | None = None,
               state_keys: Sequence[str] = STATE_KEYS):
    self._state_keys = tuple(state_keys)
    try:
      import torch  # pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
      raise ImportError(
          f"reading {', '.join(files)} needs torch (PyTorch pickle format); install torch or "
          "convert the checkpoint to .safetensors") from None
    self.files = tuple(files)
    self._key_file: dict[str, str] = {}
    self._meta: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    self._loaded_file: str | None = None
    self._loaded: dict | None = None
    by_name = {os.path.basename(f): f for f in self.files}
    if weight_map is not None and len(self.files) > 1:
      for key, name in weight_map.items():
        if name not in by_name:
          raise ValueError(f"index names shard {name!r} for {key!r}, which is not present")
        self._key_file[key] = by_name[name]
    else:
      for file in self.files:
        for key in self._load(file):
          if key in self._key_file:
            raise ValueError(f"tensor {key!r} appears in two files: {self._key_file[key]} and {file}")
          self._key_file[key] = file
    # Group keys by file so iteration reads each shard once.
    order = {f: i for i, f in enumerate(self.files)}
    self._keys = sorted(self._key_file, key=lambda k: order[self._key_file[k]])

  def _load(self, file: str) -> dict:
    if self._loaded_file != file:
      import torch  # pylint: disable=import-outside-toplevel
      self._loaded = None  # drop the previous shard before loading the next
      try:
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
      except pickle.UnpicklingError as e:
        raise _refused(file, e) from None
      except Exception:  # pylint: disable=broad-except
        try:  # the legacy (non-zip) format cannot be memory-mapped
          obj = torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
          raise _refused(file, e) from None
        except Exception as e:  # pylint: disable=broad-except
          raise ValueError(f"{file}: torch.load(weights_only=True) failed: {e}") from None
      self._loaded, self._loaded_file = _torch_state_dict(obj, file, self._state_keys), file
    return self._loaded

  def keys(self) -> list[str]:
    return list(self._keys)

  def __contains__(self, key: str) -> bool:
    return key in self._key_file

  def _tensor(self, key: str):
    if key not in self._key_file:
      raise self._missing(key)
    tensors = self._load(self._key_file[key])
    if key not in tensors:
      raise KeyError(f"tensor {key!r} is listed for {self._key_file[key]} but not in it")
    return tensors[key]

  def shape(self, key: str) -> tuple[int, ...]:
    if key not in self._meta:
      import torch  # pylint: disable=import-outside-toplevel
      t = self._tensor(key)
      self._meta[key] = (tuple(t.shape), _torch_to_numpy(torch.empty(0, dtype=t.dtype)).dtype)
    return self._meta[key][0]

  def dtype(self, key: str) -> np.dtype:
    self.shape(key)
    return self._meta[key][1]

  def get(self, key: str) -> np.ndarray:
    return np.array(_torch_to_numpy(self._tensor(key)))  # copy: detach from the mmap

  def close(self) -> None:
    self._loaded = self._loaded_file = None



class CombinedReader(CheckpointReader):
  """Several checkpoints as one, each key prefixed with its source name and ':'.

  `CombinedReader({'llm': llama_reader, 'clip': clip_reader})` has keys such as
  'llm:model.norm.weight', so one mapping table (rules prefixed with
  `mapping.prefixed`) can convert a model assembled from several checkpoints and report
  every problem across all of them at once.
  """

  def __init__(self, readers: Mapping[str, CheckpointReader]):
    self.readers = dict(readers)
    self.files = tuple(f for r in self.readers.values() for f in r.files)

  def _split(self, key: str) -> tuple[CheckpointReader, str]:
    name, sep, inner = key.partition(":")
    if not sep or name not in self.readers:
      raise KeyError(f"tensor {key!r}: no source named {name!r} (sources: {sorted(self.readers)})")
    return self.readers[name], inner

  def keys(self) -> list[str]:
    return [f"{name}:{k}" for name, r in self.readers.items() for k in r.keys()]

  def __contains__(self, key: str) -> bool:
    name, _, inner = key.partition(":")
    return name in self.readers and inner in self.readers[name]

  def shape(self, key: str) -> tuple[int, ...]:
    reader, inner = self._split(key)
    return reader.shape(inner)

  def dtype(self, key: str) -> np.dtype:
    reader, inner = self._split(key)
    return reader.dtype(inner)

  def get(self, key: str) -> np.ndarray:
    reader, inner = self._split(key)
    return reader.get(inner)

  def close(self) -> None:
    for r in self.readers.values():
      r.close()

  def __repr__(self) -> str:
    return "CombinedReader(" + ", ".join(f"{n}={r!r}" for n, r in self.readers.items()) + ")"


def _from_index(index_path: str) -> CheckpointReader:
  try:
    with open(index_path) as f:
      weight_map = json.load(f)["weight_map"]
  except (OSError, ValueError, KeyError) as e:
    raise ValueError(f"{index_path}: not a readable checkpoint index ({e})") from None
  folder = os.path.dirname(index_path)
  files = sorted({os.path.join(folder, name) for name in weight_map.values()})
  absent = [f for f in files if not os.path.exists(f)]
  if absent:
    raise FileNotFoundError(f"{index_path} names shard(s) that do not exist: {absent}")
  if all(f.endswith(".safetensors") for f in files):
    return SafetensorsReader(files, weight_map)
  if all(f.endswith(TORCH_SUFFIXES) for f in files):
    return TorchReader(files, weight_map)
  raise ValueError(f"{index_path}: shards of mixed or unknown format: {files}")


def _from_file(path: str) -> CheckpointReader:
  if path.endswith(".index.json"):
    return _from_index(path)
  if path.endswith(".safetensors"):
    return SafetensorsReader([path])
  if path.endswith(TORCH_SUFFIXES):
    return TorchReader([path])
  raise ValueError(
      f"{path}: unknown checkpoint format (expected .safetensors, "
      f"{', '.join(TORCH_SUFFIXES)} or .index.json)")


def open_checkpoint(path: str | os.PathLike) -> CheckpointReader:
  """Opens a checkpoint file or folder (see the module docstring for what is accepted)."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint path does not exist: {path}")
  if not os.path.isdir(path):
    return _from_file(path)
  names = sorted(os.listdir(path))
  join = lambda *ns: [os.path.join(path, n) for n in ns]
  for preferred in ("model.safetensors.index.json", "model.safetensors",
                    "pytorch_model.bin.index.json", "pytorch_model.bin"):
    if preferred in names:
      return _from_file(join(preferred)[0])
  for pattern_suffixes in ((".safetensors.index.json",), (".safetensors",),
                           (".bin.index.json",), TORCH_SUFFIXES):
    found = [n for n in names if n.endswith(pattern_suffixes)]
    if len(found) == 1:
      return _from_file(join(found[0])[0])
    if len(found) > 1:
      if pattern_suffixes == (".safetensors",):  # shards without an index
        return SafetensorsReader(join(*found))
      raise ValueError(
          f"{path}: several candidate checkpoints {found}; pass the file to use instead of the folder")
  raise FileNotFoundError(
      f"{path}: no checkpoint found (looked for *.safetensors, *.index.json, "
      f"{', '.join('*' + s for s in TORCH_SUFFIXES)})")


def read_json(file: str | os.PathLike) -> dict:
  """A JSON file's contents; an error names the file when it is not valid JSON."""
  file = os.fspath(file)
  with open(file) as f:
    try:
      return json.load(f)
    except ValueError as e:
      raise ValueError(f"{file}: not valid JSON ({e})") from None


def hf_config(path_or_dict, what: str) -> tuple[dict, str, str | None]:
  """(config dict, where it came from, the folder) for an HF folder, config.json path or dict.

  `what` names the model kind in the error when a folder has no config.json.
  """
  if isinstance(path_or_dict, Mapping):
    return dict(path_or_dict), "config.json", None
  path = os.fspath(path_or_dict)
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  where = os.path.join(path, "config.json") if os.path.isdir(path) else path
  if not os.path.exists(where):
    raise FileNotFoundError(f"no config.json at {where} (an HF {what} folder needs one)")
  return read_json(where), where, folder


def preprocessor_normalisation(folder: str | None) -> dict:
  """{'mean', 'std'} from an HF folder's preprocessor_config.json, or {} when it has none."""
  processor = os.path.join(folder, "preprocessor_config.json") if folder else None
  if not processor or not os.path.exists(processor):
    return {}
  pre = read_json(processor)
  if "image_mean" not in pre or "image_std" not in pre:
    return {}
  return dict(mean=tuple(map(float, pre["image_mean"])), std=tuple(map(float, pre["image_std"])))
