"""Reading PyTorch `.bin`/`.pt`/`.pth`/`.ckpt` files, only through
`torch.load(weights_only=True)` (never a plain pickle), and only when torch is installed.

Checkpoints are untrusted input. A pickle that needs code execution to load (anything
beyond tensors and plain containers) is refused, with a message saying to convert it to
safetensors; it is never retried with weights_only=False. bfloat16 and float8 tensors
come back as `ml_dtypes` arrays.
"""

import os
import pickle
from typing import Mapping, Sequence

import ml_dtypes
import numpy as np

from leo_mini_jax.porting.checkpoint_reader import CheckpointReader

TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


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
