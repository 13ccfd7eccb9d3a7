"""Bad data: malformed JSON, bad records and bad images are named or skipped and counted
by reason; a seeded fuzz set of a few hundred broken records trains."""

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from leo_mini_jax.data import conversation as conv
from leo_mini_jax.data import images
from leo_mini_jax.data import llava
from leo_mini_jax.data import pipeline
from leo_mini_jax.data import tokenizers as tokenizers_lib
from leo_mini_jax.data import validation

R = 32
GOOD_TURNS = [{"from": "human", "value": "<image>\nWhat colour?"},
              {"from": "gpt", "value": "red"}]


def _png(array, mode=None) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array, mode).save(buffer, "PNG") if mode else \
      Image.fromarray(array).save(buffer, "PNG")
  return buffer.getvalue()


def _huge_png_header(width: int, height: int) -> bytes:
  """A 1x1 PNG whose IHDR claims width × height (a decompression-bomb header)."""
  data = bytearray(_png(np.zeros((1, 1, 3), np.uint8)))
  ihdr = bytearray(data[12:29])  # 'IHDR' + 13 bytes of fields
  ihdr[4:12] = struct.pack(">II", width, height)
  data[12:29] = ihdr
  data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
  return bytes(data)


def _image_files(root, rng):
  """name → (bytes, expected reason kind): one file per kind of image fault."""
  rgb = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
  jpeg = io.BytesIO()
  Image.fromarray(rgb).save(jpeg, "JPEG", quality=90)
  jpeg = jpeg.getvalue()
  cmyk = io.BytesIO()
  Image.fromarray(rgb).convert("CMYK").save(cmyk, "JPEG")
  palette = io.BytesIO()
  Image.fromarray(rgb).convert("P").save(palette, "PNG", transparency=0)
  files = {
      "good.png": (_png(rgb), "kept"),
      "good.jpg": (jpeg, "kept"),
      "cmyk.jpg": (cmyk.getvalue(), "kept"),
      "la.png": (_png(np.stack([rgb[..., 0], rgb[..., 1]], -1), "LA"), "kept"),
      "palette.png": (palette.getvalue(), "kept"),
      "grey16.png": (_png((rgb[..., 0].astype(np.uint16) * 257)), "kept"),
      "empty.png": (b"", "image_empty"),
      "cut.png": (_png(rgb)[:-30], "image_unreadable"),
      "cut.jpg": (jpeg[:len(jpeg) // 2], "image_unreadable"),
      "text.png": (b"hello, this is not an image\n" * 4, "image_unreadable"),
      "bomb.png": (_huge_png_header(30000, 30000), "image_too_large"),
      "big.png": (_huge_png_header(10000, 10000), "image_too_large"),
  }
  for name, (data, _) in files.items():
    (root / name).write_bytes(data)
  return files


def test_malformed_json_names_file_line_and_column(tmp_path):
  path = tmp_path / "cut.json"
  path.write_text('[\n  {"id": "a", "conversations": []},\n  {"id": "b", "conv')
  with pytest.raises(ValueError, match=r"cut\.json:3:\d+: not valid JSON"):
    llava.read_llava_json(str(path))
  lines = tmp_path / "bad.jsonl"
  lines.write_text('{"id": 1}\n\n{"id": 2}\n{"id": 3,,}\n')
  with pytest.raises(ValueError, match=r"bad\.jsonl:4:\d+: not valid JSON"):
    llava.read_llava_json(str(lines))
  binary = tmp_path / "binary.json"
  binary.write_bytes(b"[\xff\xfe]")
  with pytest.raises(ValueError, match="binary.json: not UTF-8"):
    llava.read_llava_json(str(binary))


def test_every_image_fault_is_classified(tmp_path):
  files = _image_files(tmp_path, np.random.default_rng(0))
  for name, (_, kind) in files.items():
    problem = images.image_problem(str(tmp_path / name), "verify")
    assert (problem[0] if problem else "kept") == kind, (name, problem)
  assert images.image_problem(str(tmp_path / "gone.png"))[0] == "image_missing"
  assert images.image_problem(str(tmp_path / "good.png"), max_pixels=100)[0] == \
      "image_too_large"
  # 'exists' only stats; 'decode' agrees with 'verify' on these.
  assert images.image_problem(str(tmp_path / "cut.png"), "exists") is None
  assert images.image_problem(str(tmp_path / "empty.png"), "exists")[0] == "image_empty"
  for name, (_, kind) in files.items():
    problem = images.image_problem(str(tmp_path / name), "decode")
    assert (problem[0] if problem else "kept") == kind, (name, problem)


def test_odd_modes_convert_to_the_right_pixels(tmp_path):
  files = _image_files(tmp_path, np.random.default_rng(0))
  grey16 = np.asarray(Image.open(io.BytesIO(files["grey16.png"][0])))
  got = np.asarray(images.load_image(str(tmp_path / "grey16.png")))
  np.testing.assert_array_equal(got[..., 0], (grey16 >> 8).astype(np.uint8))
  assert got.std() > 10  # a plain convert('RGB') clips 16-bit values to white
  la = np.asarray(Image.open(io.BytesIO(files["la.png"][0])))
  got = np.asarray(images.load_image(str(tmp_path / "la.png"), background_rgb=(0, 0, 0)))
  want = np.round(la[..., 0].astype(np.float64) * la[..., 1] / 255)
  np.testing.assert_allclose(got[..., 0], want, atol=1)
  # Transparent palette index 0 shows the padding colour.
  palette = Image.open(io.BytesIO(files["palette.png"][0]))
  transparent = np.asarray(palette) == 0
  got = np.asarray(images.load_image(palette, background_rgb=(1, 2, 3)))
  if transparent.any():
    np.testing.assert_array_equal(got[transparent], np.tile((1, 2, 3), (transparent.sum(), 1)))
  for name in ("cmyk.jpg", "good.jpg"):
    assert images.to_master_resolution(str(tmp_path / name), R).shape == (R, R, 3)


def _fuzz_records(root, seed: int, num: int):
  """(records, expected reason kind per record, expected number truncated)."""
  rng = np.random.default_rng(seed)
  files = _image_files(root, rng)
  long_answer = "This is a long answer. " * 12
  faults = [
      ("kept", lambda: {"image": "good.png", "conversations": GOOD_TURNS}),
      ("kept", lambda: {"conversations": [{"from": "human", "value": "Say hi."},
                                          {"from": "gpt", "value": "hi"}]}),
      ("not_an_object", lambda: ["text", 3, None, [1, 2]][rng.integers(4)]),
      ("bad_field", lambda: {"id": {"x": 1}, "conversations": GOOD_TURNS}),
      ("bad_field", lambda: {"image": ["a.png", "b.png"], "conversations": GOOD_TURNS}),
      ("bad_field", lambda: {"image": "good.png", "answer": [1], "conversations": GOOD_TURNS}),
      ("bad_conversation", lambda: {"image": "good.png"}),
      ("bad_conversation", lambda: {"image": "good.png", "conversations": []}),
      ("bad_conversation", lambda: {"image": "good.png", "conversations": "hello"}),
      ("bad_conversation", lambda: {"image": "good.png", "conversations": [
          {"from": "human"}, {"from": "gpt", "value": "x"}]}),
      ("bad_conversation", lambda: {"image": "good.png", "conversations": [
          {"from": "human", "value": 7}, {"from": "gpt", "value": "x"}]}),
      ("bad_conversation", lambda: {"image": "good.png", "conversations": [
          GOOD_TURNS[0], GOOD_TURNS[0]]}),
      ("bad_conversation", lambda: {"image": "good.png", "conversations": [
          {"from": "robot", "value": "x"}, GOOD_TURNS[1]]}),
      ("bad_conversation", lambda: {"image": "good.png", "conversations": [
          GOOD_TURNS[0], {"from": "gpt", "value": "  "}]}),
      # (several markers in the first turn are merged, as LLaVA does; one in a later turn
      # would need a second image)
      ("bad_conversation", lambda: {"image": "good.png", "conversations": [
          *GOOD_TURNS, {"from": "human", "value": "<image> again?"}, GOOD_TURNS[1]]}),
      ("bad_conversation", lambda: {"conversations": GOOD_TURNS}),  # marker, no image
      ("no_assistant_turn", lambda: {"image": "good.png", "conversations": GOOD_TURNS[:1]}),
      ("too_long", lambda: {"image": "good.png", "conversations": [
          {"from": "human", "value": "<image>\n" + "why? " * 40}, GOOD_TURNS[1]]}),
      ("truncated", lambda: {"image": "good.png", "conversations": [
          GOOD_TURNS[0], {"from": "gpt", "value": long_answer}]}),
      ("image_missing", lambda: {"image": "nowhere.png", "conversations": GOOD_TURNS}),
  ]
  for name, (_, kind) in files.items():
    faults.append((kind, lambda name=name: {"image": name, "conversations": GOOD_TURNS}))
  records, kinds = [], []
  for index in range(num):
    kind, make = faults[rng.integers(len(faults))]
    record = make()
    if isinstance(record, dict) and "id" not in record and rng.random() < 0.9:
      record["id"] = f"r{index}"
    records.append(record)
    kinds.append(kind)
  return records, kinds


def _fuzz_config(path, **overrides):
  cfg = pipeline.default_data_config()
  cfg.update(kind="llava", train_json=path, eval_json=path, batch_size=4, max_length=96,
             resolution=R, system_prompt="", allow_truncation=True, read_threads=1)
  cfg.update(**overrides)
  return cfg


@pytest.fixture
def fuzz_json(tmp_path):
  records, kinds = _fuzz_records(tmp_path, seed=1234, num=300)
  path = tmp_path / "fuzz.json"
  path.write_text(json.dumps(records))
  return str(path), kinds


def test_fuzz_counts_by_reason_and_every_kept_row_is_real(fuzz_json):
  path, kinds = fuzz_json
  expected = {kind: kinds.count(kind) for kind in set(kinds) - {"kept", "truncated"}}
  assert len(expected) >= 9 and sum(expected.values()) > 150  # the fuzz covers the kinds
  data = pipeline.make_dataset(_fuzz_config(path), split="eval", mode="eval",
                               process_index=0, process_count=1)
  report = data.report
  assert report.reason_counts == expected
  assert len(report.truncated) == kinds.count("truncated") > 0
  assert report.num_kept == kinds.count("kept") + kinds.count("truncated")
  assert report.lost_tokens > 0 and report.length_needed > 96
  assert f"data.max_length={report.length_needed} keeps every record" in report.summary()
  # One pass: every kept record becomes a real row with answer tokens and its image.
  rows = 0
  for batch, meta in data:
    valid = meta["valid"]
    rows += int(valid.sum())
    assert (batch["loss_mask"][valid].sum(1) > 0).all()
  assert rows == report.num_kept
  # Without allow_truncation the cut records stop the run at start, naming the fields.
  with pytest.raises(validation.TruncationError,
                     match=r"data\.max_length=96.*--config\.data\.max_length=\d+.*"
                           r"allow_truncation"):
    pipeline.make_dataset(_fuzz_config(path, allow_truncation=False), split="eval",
                          mode="eval", process_index=0, process_count=1)
  # strict stops at start on the first bad record in file order.
  first_bad = next(i for i, kind in enumerate(kinds) if kind not in ("kept", "truncated"))
  with pytest.raises(llava.InvalidRecordError, match=rf"#{first_bad}\)"):
    pipeline.make_dataset(_fuzz_config(path, strict=True), split="eval", mode="eval",
                          process_index=0, process_count=1)


@pytest.mark.slow  # ~60 s of CPU: compiles the tiny model's train step
def test_fuzz_trains_a_few_steps(fuzz_json, tmp_path):
  """The tiny config trains on the fuzz set (a few steps) with its bad records skipped."""
  from leo_mini_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from leo_mini_jax.training import loop  # pylint: disable=g-import-not-at-top
  from tests.training.conftest import small_config  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  path, _ = fuzz_json
  config = small_config(2)
  config.data.update(kind="llava", train_json=path, eval_json=path, max_length=96,
                     resolution=64, allow_truncation=True, batch_size=4)
  config.total_steps = 3
  mesh = mesh_lib.make_mesh(dict(data=1), devices=jax.devices()[:1])
  result = loop.train(config, str(tmp_path / "run"), progress=False, mesh=mesh)
  losses = [row["loss"] for row in result["history"]]
  assert len(losses) == 3 and all(np.isfinite(losses)) and min(losses) > 0.1


def test_tfds_build_skips_and_counts_bad_records(fuzz_json, tmp_path):
  pytest.importorskip("tensorflow_datasets")
  from leo_mini_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
  path, kinds = fuzz_json
  records = json.loads(open(path).read())[:60]
  kinds = kinds[:60]
  small = tmp_path / "small.json"
  small.write_text(json.dumps(records))
  _, reports = tfds_builder.build({"train": str(small)}, str(tmp_path / "tfds"))
  report = reports["train"]
  # The build has no tokenizer: length faults are found when the pipeline reads it.
  expected = {kind: kinds.count(kind) for kind in set(kinds)
              - {"kept", "truncated", "too_long"}}
  assert report.reason_counts == expected
  cfg = _fuzz_config("", kind="tfds", tfds_dir=str(tmp_path / "tfds"),
                     tfds_eval_split="train")
  data = pipeline.make_dataset(cfg, split="eval", mode="eval", process_index=0,
                               process_count=1)
  assert data.report.reason_counts == ({"too_long": kinds.count("too_long")}
                                       if "too_long" in kinds else {})
  assert data.num_examples == kinds.count("kept") + kinds.count("truncated")


def test_template_tokens_only_in_tokenizer():
  """A sanity check that the fuzz's byte tokenizer lays out records as the pipeline does."""
  tok = tokenizers_lib.ByteTokenizer()
  out = conv.tokenize_conversation(GOOD_TURNS, tok, conv.get_template("vicuna_v1", ""),
                                   has_image=True)
  assert sum(out.loss_mask) == len(" red") + 1
