"""LLaVA JSON source: round trip from the synthetic export, text-only, bad records."""

import json
import logging

import numpy as np
import pytest

from leo_mini_jax.data import conversation as conv
from leo_mini_jax.data import encoder
from leo_mini_jax.data import images
from leo_mini_jax.data import llava
from leo_mini_jax.data import pipeline
from leo_mini_jax.data import synthetic
from leo_mini_jax.data import tokenizers as tokenizers_lib

R = 32


@pytest.fixture
def exported(tmp_path):
  json_path = synthetic.export(str(tmp_path), "train", 6, R, seed=1)
  return tmp_path, json_path, synthetic.SyntheticVQA("train", 6, R, seed=1)


def _write(path, records):
  path.write_text(json.dumps(records))
  return str(path)


def test_round_trip_from_the_synthetic_export(exported):
  _, json_path, source = exported
  loaded, report = llava.load_llava(json_path)
  assert report.num_records == report.num_kept == 6 and not report.skipped
  assert len(loaded) == 6
  for i in range(6):
    record, ex = loaded[i], source[i]
    assert record["id"] == ex["id"]
    assert record["conversations"] == ex["conversations"]
    assert record["answer"] == ex["answer"] == ex["conversations"][1]["value"]
    assert record["question_type"] == ex["question_type"]
    np.testing.assert_array_equal(images.to_master_resolution(record["image"], R),
                                  ex["image"])


def test_text_only_records(exported):
  root, json_path, _ = exported
  records = json.loads(open(json_path).read())[:2]
  records.append({"id": "text-1", "conversations": [
      {"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]})
  records.append({"id": "text-2", "image": None, "conversations": [
      {"from": "human", "value": "Two?"}, {"from": "gpt", "value": "2"}]})
  path = _write(root / "mixed.json", records)
  loaded, report = llava.load_llava(path)
  assert not report.skipped and len(loaded) == 4
  assert loaded[2]["image"] is None and loaded[3]["image"] is None
  assert loaded[2]["answer"] == "hi"
  cfg = pipeline.default_data_config()
  cfg.update(kind="llava", eval_json=path, batch_size=4, max_length=64, resolution=R,
             system_prompt="")
  batch, meta = next(iter(pipeline.make_dataset(cfg, split="eval", process_index=0,
                                                process_count=1, mode="eval")))
  np.testing.assert_array_equal(batch["has_image"], [True, True, False, False])
  placeholders = (batch["input_ids"] == conv.IMAGE_PLACEHOLDER_ID).sum(1)
  np.testing.assert_array_equal(placeholders, [1, 1, 0, 0])
  assert not batch["image"][2:].any() and batch["image"][:2].any()
  assert meta["id"][2:] == ["text-1", "text-2"] and meta["valid"].all()
  tok = tokenizers_lib.ByteTokenizer()
  assert tok.decode(batch["input_ids"][2][batch["loss_mask"][2] == 1]).strip() == "hi"


def _bad_json(root, good_records):
  (root / "garbage.png").write_bytes(b"this is not a png")
  bad = [
      dict(good_records[0], id="missing-image", image="images/does-not-exist.png"),
      dict(good_records[1], id="unreadable-image", image="garbage.png"),
      dict(good_records[2], id="malformed-conversation", conversations=[
          {"from": "human", "value": "<image>\nQ"}, {"from": "human", "value": "again"}]),
  ]
  records = [good_records[3], bad[0], good_records[4], bad[1], bad[2], good_records[5]]
  return _write(root / "bad.json", records)


def test_bad_records_are_skipped_and_named(exported, caplog):
  root, json_path, _ = exported
  path = _bad_json(root, json.loads(open(json_path).read()))
  with caplog.at_level(logging.WARNING, logger=llava.logger.name):
    loaded, report = llava.load_llava(path)
  assert report.num_records == 6 and report.num_kept == 3 and len(loaded) == 3
  assert report.num_skipped == 3
  assert report.skipped_ids == ["missing-image", "unreadable-image",
                                "malformed-conversation"]
  reasons = dict(report.skipped)
  assert "not found" in reasons["missing-image"]
  assert "unreadable" in reasons["unreadable-image"]
  assert "alternate" in reasons["malformed-conversation"]
  assert "3 skipped" in report.summary()
  assert "unreadable-image" in caplog.text
  with pytest.raises(llava.InvalidRecordError, match="'missing-image'.*not found"):
    llava.load_llava(path, strict=True)


def test_strict_names_the_first_bad_record_in_file_order(exported):
  root, json_path, _ = exported
  records = json.loads(open(json_path).read())
  records[4] = dict(records[4], conversations=[{"from": "human", "value": "only"}])
  records[2] = dict(records[2], image="images/gone.png")
  path = _write(root / "two_bad.json", records)
  with pytest.raises(llava.InvalidRecordError, match=rf"{records[2]['id']}.*#2"):
    llava.load_llava(path, strict=True)
  _, report = llava.load_llava(path)
  assert dict(report.skipped)[records[4]["id"]] == "no assistant (gpt) turn"


def test_overlong_records_truncate_or_drop(exported):
  root, json_path, _ = exported
  records = json.loads(open(json_path).read())[:2]
  records[1]["conversations"][1]["value"] = "a long answer " * 8
  path = _write(root / "long.json", records)
  tok = tokenizers_lib.ByteTokenizer()
  template = conv.get_template("vicuna_v1", "")
  check = llava.LengthCheck(tok, template, 64, "truncate", allow_truncation=True)
  _, report = llava.load_llava(path, length_check=check)
  assert report.truncated == [records[1]["id"]] and not report.skipped
  check = llava.LengthCheck(tok, template, 64, "drop", allow_truncation=True)
  loaded, report = llava.load_llava(path, length_check=check)
  assert report.skipped_ids == [records[1]["id"]] and len(loaded) == 1
  assert "max_length 64" in report.skipped[0][1]


def test_decode_failure_after_validation_becomes_an_empty_row(exported, caplog):
  """'exists' lets a corrupt file through; the transform must not crash on it."""
  root, json_path, _ = exported
  records = json.loads(open(json_path).read())[:3]
  (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n corrupt")
  records[1]["image"] = "corrupt.png"
  path = _write(root / "late.json", records)
  cfg = pipeline.default_data_config()
  cfg.update(kind="llava", eval_json=path, batch_size=4, max_length=64, resolution=R,
             system_prompt="", image_check="exists")
  with caplog.at_level(logging.WARNING, logger=encoder.logger.name):
    batch, meta = next(iter(pipeline.make_dataset(cfg, split="eval", process_index=0,
                                                  process_count=1, mode="eval")))
  np.testing.assert_array_equal(meta["valid"], [True, False, True, False])
  assert meta["id"][1] == records[1]["id"] and records[1]["id"] in caplog.text
  assert batch["loss_mask"][1].sum() == 0 and batch["attention_mask"][1].sum() == 1
  assert not batch["has_image"][1] and batch["loss_mask"][0].sum() > 0


def test_file_errors_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.json"):
    llava.load_llava(str(tmp_path / "nope.json"))
  (tmp_path / "broken.json").write_text("[{")
  with pytest.raises(ValueError, match="broken.json"):
    llava.load_llava(str(tmp_path / "broken.json"))
  (tmp_path / "obj.json").write_text("{}")
  with pytest.raises(ValueError, match="obj.json: expected a JSON list"):
    llava.load_llava(str(tmp_path / "obj.json"))


@pytest.mark.parametrize("aspect", ["pad", "crop"])
def test_image_aspect_and_marker_position_reach_the_rows(tmp_path, aspect):
  """A wide image and a trailing marker as LLaVA-665K has them: the row's image follows
  data.image_aspect, and its placeholder comes before the question (image_position)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  pixels = np.zeros((R, 2 * R, 3), np.uint8)
  pixels[:, :R // 2] = (255, 0, 0)
  pixels[:, R // 2:3 * R // 2] = (0, 255, 0)
  pixels[:, 3 * R // 2:] = (0, 0, 255)
  Image.fromarray(pixels).save(tmp_path / "wide.png")
  json_path = _write(tmp_path / "d.json", [{"id": "w", "image": "wide.png", "conversations": [
      {"from": "human", "value": "What colour?\n<image>"}, {"from": "gpt", "value": "green"}]}])
  cfg = pipeline.default_data_config()
  cfg.update(kind="llava", train_json=json_path, eval_json=json_path, batch_size=1,
             resolution=R, system_prompt="", image_aspect=aspect, read_threads=1)
  batch, _ = next(iter(pipeline.make_dataset(cfg, split="eval", mode="eval",
                                             process_index=0, process_count=1)))
  np.testing.assert_array_equal(batch["image"][0],
                                images.to_master_resolution(pixels, R, aspect=aspect))
  if aspect == "crop":
    assert (batch["image"][0] == (0, 255, 0)).all()
  ids = batch["input_ids"][0].tolist()
  tok = tokenizers_lib.ByteTokenizer()
  at = ids.index(conv.IMAGE_PLACEHOLDER_ID)
  assert tok.decode(ids[at + 1:at + 1 + len("\nWhat colour?")]) == "\nWhat colour?"
