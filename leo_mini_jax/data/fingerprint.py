"""A short fingerprint of a split's usable records, saved with the data position.

The data position is a count of examples of one shuffled stream; it only means the
same thing on resume if the records behind the stream are the same. A record or image
removed (or fixed, so that a skipped record becomes usable) since the checkpoint
shifts every later position: the resumed run would read another order without any
sign. The fingerprint hashes what defines the stream: the kind of source, its length,
and each usable record's id and image path (LLaVA JSON), the kept indices (a validated
tfds split), or the generator's parameters (synthetic scenes).
"""

import hashlib
import json
from typing import Any


def _describe(source: Any, digest) -> None:
  digest.update(f"{type(source).__name__}:{len(source)}".encode())
  records = getattr(source, "_records", None)  # llava.LlavaSource
  if records is not None:
    for record in records:
      digest.update(json.dumps([record.get("id"), record.get("image")],
                               default=str).encode())
    return
  indices = getattr(source, "indices", None)  # pipeline.Subset
  if indices is not None:
    digest.update(json.dumps(list(map(int, indices))).encode())
    _describe(source.source, digest)
    return
  # Sources defined by their parameters (synthetic scenes, a tfds split).
  for name in ("split", "num", "resolution", "seed", "question_types", "style",
               "dataset_dir"):
    if hasattr(source, name):
      digest.update(f"{name}={getattr(source, name)!r}".encode())


def source_fingerprint(source: Any) -> str:
  """16 hex digits that change when the usable records (or their order) change."""
  digest = hashlib.sha256()
  _describe(source, digest)
  return digest.hexdigest()[:16]
