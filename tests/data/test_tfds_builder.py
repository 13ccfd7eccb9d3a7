"""TFDS ArrayRecord build of LLaVA JSON: read back identical, same batches as the JSON."""

import json
import os

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")
pytest.importorskip("array_record")

from leo_mini_jax.data import pipeline  # pylint: disable=g-import-not-at-top
from leo_mini_jax.data import synthetic  # pylint: disable=g-import-not-at-top
from leo_mini_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top

R = 32


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("llava")
  train_json = synthetic.export(str(root), "train", 6, R, seed=0)
  eval_json = synthetic.export(str(root), "eval", 5, R, seed=0)
  # One text-only record and one broken record in the eval split.
  records = json.loads(open(eval_json).read())
  records.append({"id": "text-only", "conversations": [
      {"from": "human", "value": "Say red."}, {"from": "gpt", "value": "red"}]})
  records.append({"id": "broken", "image": "images/missing.png",
                  "conversations": records[0]["conversations"]})
  with open(eval_json, "w") as f:
    json.dump(records, f)
  out = str(tmp_path_factory.mktemp("tfds"))
  dataset_dir, reports = tfds_builder.build({"train": train_json, "eval": eval_json}, out,
                                            str(root))
  return root, train_json, eval_json, out, dataset_dir, reports


def test_build_reads_back_identical_examples(built):
  root, train_json, eval_json, out, dataset_dir, reports = built
  assert reports["eval"].skipped_ids == ["broken"] and not reports["train"].skipped
  assert any(name.endswith(".array_record-00000-of-00001") or ".array_record" in name
             for name in os.listdir(dataset_dir))
  for split, json_path in (("train", train_json), ("eval", eval_json)):
    records = [r for r in json.loads(open(json_path).read()) if r["id"] != "broken"]
    source = tfds_builder.TfdsSource(out, split)
    assert len(source) == len(records)
    for i, record in enumerate(records):
      got = source[i]
      assert got["id"] == record["id"]
      assert got["conversations"] == record["conversations"]
      if "image" in record:
        with open(os.path.join(root, record["image"]), "rb") as f:
          assert got["image"] == f.read()
        assert got["answer"] == record["answer"]
        assert got["question_type"] == record["question_type"]
      else:
        assert got["image"] is None and got["answer"] == "red"


def test_tfds_and_json_pipelines_give_the_same_batches(built):
  root, _, eval_json, out, _, _ = built
  cfg = pipeline.default_data_config()
  cfg.update(resolution=R, max_length=64, system_prompt="", batch_size=4, read_threads=1)
  for mode in ("eval", "generate"):
    cfg.update(kind="llava", eval_json=eval_json, image_root=str(root))
    from_json = list(pipeline.make_dataset(cfg, split="eval", process_index=0,
                                           process_count=1, mode=mode))
    cfg.update(kind="tfds", tfds_dir=out)
    from_tfds = list(pipeline.make_dataset(cfg, split="eval", process_index=0,
                                           process_count=1, mode=mode))
    assert len(from_json) == len(from_tfds) == 2
    for (bj, mj), (bt, mt) in zip(from_json, from_tfds):
      assert mj["id"] == mt["id"] and mj["answer"] == mt["answer"]
      for key in bj:
        np.testing.assert_array_equal(bj[key], bt[key])
  cfg.update(kind="tfds", tfds_dir=out)
  train_batch = next(iter(pipeline.make_dataset(cfg, split="train", process_index=0,
                                                process_count=1)))
  assert train_batch["has_image"].all()


def test_tfds_errors_are_named(built, tmp_path):
  _, _, _, out, _, _ = built
  with pytest.raises(ValueError, match="no split 'test'"):
    tfds_builder.TfdsSource(out, "test")
  with pytest.raises(FileNotFoundError, match="data.tfds_dir"):
    tfds_builder.TfdsSource(str(tmp_path), "train")
