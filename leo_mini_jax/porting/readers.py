"""Reading PyTorch checkpoints tensor by tensor, as numpy arrays.

`open_checkpoint(path)` accepts

  * a directory holding `model.safetensors`, sharded safetensors with
    `model.safetensors.index.json`, any other single `*.safetensors` file, or
    `pytorch_model.bin` (optionally sharded with `pytorch_model.bin.index.json`) / `*.pt` / `*.pth`;
  * a single `.safetensors`, `.bin`, `.pt`, `.pth` or `.ckpt` file, or an `*.index.json` file.

and returns a `CheckpointReader` (checkpoint_reader.py) with `keys()`, `shape(key)`,
`dtype(key)` and `get(key)`. Nothing is read until `get` is called, and `get` reads one
tensor, so a converter that processes tensors one at a time holds at most one source
tensor beside its output.

Each format has its reader, with its own checks of untrusted input:
`safetensors_reader.SafetensorsReader` (headers checked against the file first) and
`torch_reader.TorchReader` (`torch.load(weights_only=True)` only). This module picks
one for a path, and reads the JSON beside a checkpoint (config.json, the preprocessor's
normalisation).
"""

import json
import os
from typing import Mapping

# The readers, importable from here as from their own modules.
from leo_mini_jax.porting.checkpoint_reader import CheckpointReader, CombinedReader
from leo_mini_jax.porting.safetensors_reader import SAFETENSORS_DTYPES, SafetensorsReader
from leo_mini_jax.porting.torch_reader import STATE_KEYS, TORCH_SUFFIXES, TorchReader


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


__all__ = ["open_checkpoint", "read_json", "hf_config", "preprocessor_normalisation",
           "CheckpointReader", "CombinedReader", "SafetensorsReader", "TorchReader",
           "SAFETENSORS_DTYPES", "STATE_KEYS", "TORCH_SUFFIXES"]
