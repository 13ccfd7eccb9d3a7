"""The interface every checkpoint reader has, and several checkpoints read as one.

A `CheckpointReader` is a read-only, lazily loaded mapping from tensor name to numpy
array: `keys()`, `shape(key)` and `dtype(key)` read no tensor data, `get(key)` reads one
tensor. The readers of each file format (`safetensors_reader.py`, `torch_reader.py`)
implement it; `readers.open_checkpoint` picks one for a path.
"""

from typing import Iterator, Mapping

import numpy as np


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
