"""LLaVA JSON + images → a TFDS dataset in ArrayRecord files (no TensorFlow needed).

tensorflow-datasets builds and reads datasets without TensorFlow only with
file_format='array_record' and `as_data_source` (random access, which grain needs); the
builder's DatasetInfo is built directly. Features:

  id             Text
  image          the original encoded file bytes (PNG/JPEG/...), b'' for text-only records
  conversations  Text: the LLaVA turn list as JSON (keeps any number of turns)
  question_type  Text ('' if absent)
  answer         Text (the explicit answer or the first gpt turn)

Records are validated while building (conversation structure, image present and passing
PIL's verify; see llava.py) and bad ones are skipped and reported, or stop the build with
strict=True. Token lengths depend on the tokenizer, so they are checked when the pipeline
reads the dataset. Record order is kept (shuffling is the pipeline's job).

  python -m leo_mini_jax.data.tfds_builder --out DIR --image_root ROOT \\
      --split train=train.json --split eval=eval.json
"""

import argparse
import json
import os
from typing import Any, Sequence

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from leo_mini_jax.data import images as images_lib
from leo_mini_jax.data import llava

VERSION = "1.0.0"


class LlavaJson(tfds.core.GeneratorBasedBuilder):
  """Builds one TFDS dataset (splits named by the caller) from validated LLaVA records."""

  VERSION = tfds.core.Version(VERSION)

  # TFDS's default looks the file up through importlib resources and, for a package
  # outside its registry, needs the optional `importlib_resources` backport; the class's
  # own file is the answer anyway.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def __init__(self, *, split_sources: dict[str, llava.LlavaSource] | None = None,
               **kwargs):
    self._split_sources = split_sources or {}
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="LLaVA-format conversations with encoded images (leo_mini_jax).",
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),
            "conversations": tfds.features.Text(),
            "question_type": tfds.features.Text(),
            "answer": tfds.features.Text(),
        }),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    if not self._split_sources:
      raise ValueError("LlavaJson: no splits to build (pass split_sources=)")
    return {split: self._generate_examples(source)
            for split, source in self._split_sources.items()}

  def _generate_examples(self, source: llava.LlavaSource):
    limits = images_lib.ImageLimits(root=source.image_root)  # as load_llava checked them
    for index in range(len(source)):
      record = source[index]
      image = b""
      if record["image"] is not None:
        image = images_lib.read_image_file(record["image"], limits)
      yield index, {
          "id": record["id"],
          "image": image,
          "conversations": json.dumps(record["conversations"], ensure_ascii=False),
          "question_type": record["question_type"],
          "answer": record["answer"],
      }


def build(split_jsons: dict[str, str], out_dir: str, image_root: str = "", *,
          strict: bool = False, image_check: str = "verify"
          ) -> tuple[str, dict[str, llava.ValidationReport]]:
  """Builds the dataset under `out_dir`; returns (dataset folder, report per split)."""
  sources, reports = {}, {}
  for split, json_path in split_jsons.items():
    sources[split], reports[split] = llava.load_llava(
        json_path, image_root, strict=strict, image_check=image_check)
  builder = LlavaJson(split_sources=sources, data_dir=out_dir, file_format="array_record")
  builder.download_and_prepare()
  return str(builder.data_dir), reports


def find_dataset_dir(tfds_dir: str) -> str:
  """The folder holding dataset_info.json: `tfds_dir` itself or one below it."""
  root = epath.Path(tfds_dir)  # local or gs://
  if (root / "dataset_info.json").is_file():
    return tfds_dir
  # TFDS lays a build out as data_dir/name/version (gs:// globs have no '**').
  found = sorted(os.fspath(p.parent) for pattern in ("*/dataset_info.json",
                                                      "*/*/dataset_info.json")
                 for p in root.glob(pattern))
  if not found:
    raise FileNotFoundError(f"no TFDS dataset (dataset_info.json) under {tfds_dir} "
                            "(data.tfds_dir)")
  if len(found) > 1:
    raise ValueError(f"several TFDS datasets under {tfds_dir}: {found}; point "
                     "data.tfds_dir at one")
  return found[0]


class TfdsSource:
  """Random-access source over a built split, yielding the pipeline's record dicts.

  Items: {'id', 'image': encoded bytes or None, 'conversations' (list), 'question_type',
  'answer'}.
  """

  def __init__(self, tfds_dir: str, split: str):
    self.dataset_dir = find_dataset_dir(tfds_dir)
    builder = tfds.builder_from_directory(self.dataset_dir)
    if split not in builder.info.splits:
      raise ValueError(f"{self.dataset_dir}: no split {split!r}; has "
                       f"{sorted(builder.info.splits)}")
    self.split = split
    self._source = builder.as_data_source(split=split)

  def __len__(self) -> int:
    return len(self._source)

  def __repr__(self):
    return f"TfdsSource({self.dataset_dir!r}, {self.split!r}, {len(self)} records)"

  def __getitem__(self, index: int) -> dict[str, Any]:
    raw = self._source[int(index)]
    text = lambda key: raw[key].decode("utf-8") if isinstance(raw[key], bytes) else raw[key]
    image = raw["image"]
    return {
        "id": text("id"),
        "image": bytes(image) if len(image) else None,
        "conversations": json.loads(text("conversations")),
        "question_type": text("question_type"),
        "answer": text("answer"),
    }


def main(argv: Sequence[str] | None = None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="TFDS data_dir to build into")
  parser.add_argument("--image_root", default="", help="folder image paths are relative to")
  parser.add_argument("--split", action="append", required=True,
                      help="NAME=PATH.json, repeatable")
  parser.add_argument("--strict", action="store_true")
  parser.add_argument("--image_check", default="verify", choices=("verify", "exists"))
  args = parser.parse_args(argv)
  split_jsons = {}
  for item in args.split:
    name, sep, path = item.partition("=")
    if not sep:
      parser.error(f"--split {item!r}: expected NAME=PATH.json")
    split_jsons[name] = path
  dataset_dir, reports = build(split_jsons, args.out, args.image_root, strict=args.strict,
                               image_check=args.image_check)
  for report in reports.values():
    print(report.summary())
  print(f"built {dataset_dir}")


if __name__ == "__main__":
  main()
