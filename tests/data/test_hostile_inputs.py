"""Inputs built to break start-up or the data transform: unencodable text, thin images
whose square canvas is huge, and image paths that are FIFOs, devices, or lead outside the
image root. Each is a bad record (skipped, counted, named) and none may hang the run or
exhaust memory; the risky cases run in a thread or a memory-limited subprocess, so a
regression fails the test instead of hanging or killing the suite."""

import io
import json
import os
import subprocess
import sys
import textwrap
import threading

import ml_collections
import numpy as np
import pytest
from PIL import Image

from leo_mini_jax.data import images
from leo_mini_jax.data import pipeline
from leo_mini_jax.evaluation import ask
from leo_mini_jax.evaluation.benchmarks import base as benchmarks_base

TURNS = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _png(array) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, "PNG")
  return buffer.getvalue()


def _data_config(json_path, **overrides) -> ml_collections.ConfigDict:
  cfg = pipeline.default_data_config()
  cfg.kind, cfg.train_json, cfg.max_length, cfg.batch_size = "llava", str(json_path), 256, 2
  cfg.resolution = 16
  cfg.update(overrides)
  return cfg


def _write_json(tmp_path, records):
  path = tmp_path / "train.json"
  path.write_text(json.dumps(records))  # ensure_ascii: a lone surrogate as \ud800
  return path


def _prepare(path, **overrides) -> pipeline.PreparedSource:
  return pipeline.prepare_source(_data_config(path, **overrides), split="train",
                                 process_index=0, process_count=1)


def _in_thread(fn, timeout: float = 20.0):
  """fn()'s result, or pytest.fail when it has not returned within `timeout` seconds."""
  result = {}
  thread = threading.Thread(target=lambda: result.update(value=fn()), daemon=True)
  thread.start()
  thread.join(timeout)
  if thread.is_alive():
    pytest.fail(f"still running after {timeout} s (blocked)")
  return result["value"]


def _run_limited(code: str, memory_bytes: int, timeout: float = 60.0) -> str:
  """stdout of `code` run in a subprocess whose address space is capped."""
  script = textwrap.dedent(f"""
      import resource
      resource.setrlimit(resource.RLIMIT_AS, ({memory_bytes}, {memory_bytes}))
  """) + textwrap.dedent(code)
  env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", PYTHONPATH=REPO)
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        timeout=timeout, env=env, cwd=REPO, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  return done.stdout


def _the_one_skipped(prepared, reason_kind):
  """(id, reason) of the one record of two that validation skipped, for `reason_kind`."""
  assert prepared.num_examples == 1
  assert prepared.report.reason_counts == {reason_kind: 1}
  (rid, reason), = prepared.report.skipped
  return rid, reason


# --------------------------------------------------------------------------- text


def test_unencodable_text_is_a_skipped_named_record(tmp_path):
  (tmp_path / "a.png").write_bytes(_png(np.full((8, 8, 3), 200, np.uint8)))
  bad_turns = [{"from": "human", "value": "<image>\nWhat colour?"},
               {"from": "gpt", "value": "re\ud800d"}]  # a lone surrogate: valid JSON
  records = [{"id": "good", "image": "a.png", "conversations": TURNS},
             {"id": "surrogate", "image": "a.png", "conversations": bad_turns}]
  path = _write_json(tmp_path, records)
  rid, reason = _the_one_skipped(_prepare(path), "bad_conversation")
  assert rid == "surrogate" and "UnicodeEncodeError" in reason
  # Unvalidated, the transform turns it into an empty, invalid row instead of raising.
  unchecked = _prepare(path, validate=False)
  row, meta = unchecked.encoder(unchecked.source[1])
  assert not meta["valid"] and meta["id"] == "surrogate"
  assert row["attention_mask"].sum() == 1 and row["loss_mask"].sum() == 0


# --------------------------------------------------------------------------- thin images


def test_thin_image_fits_in_memory_on_both_aspect_paths(tmp_path):
  """A 1×60000 PNG (a few hundred bytes) padded to square would ask for a 60000² canvas
  (~14 GB), and its shortest side resized to 128 for the crop a 128×7.7M strip (~4 GB);
  under a 1.5 GB address-space cap both paths must still give a 128² image."""
  (tmp_path / "thin.png").write_bytes(_png(np.full((60000, 1, 3), 9, np.uint8)))
  out = _run_limited(f"""
      from leo_mini_jax.data import images
      limits = images.ImageLimits(max_aspect_ratio=1e9)  # let it through to the resize
      for aspect in ("pad", "crop"):
        got = images.to_master_resolution({str(tmp_path / 'thin.png')!r}, 128,
                                          aspect=aspect, limits=limits)
        print(aspect, got.shape, got.dtype)
  """, 1536 << 20)
  assert out.split("\n")[:2] == ["pad (128, 128, 3) uint8", "crop (128, 128, 3) uint8"]


def test_aspect_ratio_bound_skips_thin_images(tmp_path):
  (tmp_path / "thin.png").write_bytes(_png(np.zeros((2000, 1, 3), np.uint8)))
  (tmp_path / "tall.png").write_bytes(_png(np.zeros((150, 10, 3), np.uint8)))  # 15:1
  records = [{"id": "thin", "image": "thin.png", "conversations": TURNS},
             {"id": "tall", "image": "tall.png", "conversations": TURNS}]
  path = _write_json(tmp_path, records)
  rid, reason = _the_one_skipped(_prepare(path), "image_bad_shape")
  assert rid == "thin" and "data.max_aspect_ratio=20" in reason
  loose = _prepare(path, max_aspect_ratio=5000.0)
  assert loose.num_examples == 2
  with pytest.raises(ValueError, match="data.max_aspect_ratio"):
    _prepare(path, max_aspect_ratio=0.5)


def test_memory_error_of_one_image_is_a_bad_row(tmp_path, monkeypatch):
  (tmp_path / "a.png").write_bytes(_png(np.full((8, 8, 3), 200, np.uint8)))
  path = _write_json(tmp_path, [{"id": "x", "image": "a.png", "conversations": TURNS}])
  prepared = _prepare(path)

  def no_memory(*args, **kwargs):
    raise MemoryError("canvas")
  monkeypatch.setattr(images, "to_master_resolution", no_memory)
  row, meta = prepared.encoder(prepared.source[0])
  assert not meta["valid"] and row["loss_mask"].sum() == 0


def _smooth_image(width, height):
  y, x = np.mgrid[0:height, 0:width]
  return np.stack([128 + 100 * np.sin(x / 13.0 + y / 29.0), 128 + 100 * np.cos(y / 17.0),
                   60 + 40 * np.sin((x + y) / 23.0)], -1).astype(np.uint8)


def _references(image, resolution):
  """LLaVA's pad-then-resize and HF's resize-then-centre-crop, written out here."""
  mean = images.CLIP_MEAN_RGB
  padded = images.expand_to_square(image, mean).resize((resolution, resolution),
                                                        Image.Resampling.BICUBIC)
  width, height = image.size
  size = (resolution, int(resolution * height / width)) if width <= height else \
      (int(resolution * width / height), resolution)
  left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
  cropped = image.resize(size, Image.Resampling.BICUBIC).crop(
      (left, top, left + resolution, top + resolution))
  return {"pad": np.asarray(padded, np.int32), "crop": np.asarray(cropped, np.int32)}


@pytest.mark.parametrize("bound", [4096, 100])
def test_normal_images_keep_their_exact_pixels(monkeypatch, bound):
  """Aspect ratio <= 4: exactly pad-then-resize / resize-then-crop, even when the image
  is larger than the canvas bound (lowered to 100 px here to stand for a huge photo)."""
  monkeypatch.setattr(images, "_MAX_CANVAS_SIDE", bound)
  for width, height in ((300, 200), (120, 410), (64, 64)):
    image = Image.fromarray(_smooth_image(width, height))
    for aspect, reference in _references(image, 16).items():
      np.testing.assert_array_equal(
          images.to_master_resolution(image, 16, aspect=aspect), reference)


def test_thin_images_shrunk_first_stay_close(monkeypatch):
  """Over the canvas bound (lowered to 100-256 px here, as 4096 is to a master resolution
  of 336-1024) a thin image is shrunk before padding: within a few levels of
  pad-then-resize (the differences sit on the image/padding edge); the crop path resizes
  only the centre region, within one level."""
  for width, height in ((60, 400), (500, 80), (30, 700)):
    image = Image.fromarray(_smooth_image(width, height))
    for resolution, bound in ((16, 100), (32, 200), (64, 256)):
      references = _references(image, resolution)
      with monkeypatch.context() as patch:
        patch.setattr(images, "_MAX_CANVAS_SIDE", bound)
        for aspect, reference in references.items():
          got = images.to_master_resolution(image, resolution, aspect=aspect)
          difference = np.abs(got.astype(np.int32) - reference)
          assert difference.mean() < 1.0, (width, height, resolution, aspect)
          assert difference.max() <= (16 if aspect == "pad" else 1)


# --------------------------------------------------------------------------- paths


def test_fifo_image_is_refused_without_blocking(tmp_path):
  fifo = tmp_path / "pipe.png"
  os.mkfifo(fifo)
  try:
    for mode in ("exists", "verify"):
      kind, reason = _in_thread(lambda mode=mode: images.image_problem(str(fifo), mode))
      assert kind == "image_bad_path" and "FIFO" in reason and str(fifo) in reason
    ask_image = lambda path: ask.load_image(path, pipeline.default_data_config())
    for load in (images.load_image, benchmarks_base.check_image, ask_image):
      error = _in_thread(lambda load=load: _raised(lambda: load(str(fifo))))
      assert "FIFO" in str(error), error
  finally:  # release a reader that did block (the regression), so the thread ends
    try:
      os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
      pass


def _raised(fn):
  """The exception fn raises, or None (returned, so _in_thread can time the call)."""
  try:
    fn()
  except Exception as e:  # pylint: disable=broad-except
    return e
  return None


def test_device_link_is_refused_without_reading_it(tmp_path):
  """A link to /dev/zero would be read until memory runs out: under a 1 GB cap the check
  must answer, naming the character device."""
  os.symlink("/dev/zero", tmp_path / "zero.png")
  out = _run_limited(f"""
      from leo_mini_jax.data import images
      for mode in ("exists", "verify", "decode"):
        print(images.image_problem({str(tmp_path / 'zero.png')!r}, mode))
  """, 1 << 30)
  assert out.count("('image_bad_path'") == 3 and "character device" in out


def test_images_outside_the_root_and_over_the_byte_limit(tmp_path):
  root, outside = tmp_path / "root", tmp_path / "outside"
  root.mkdir()
  outside.mkdir()
  data = _png(_smooth_image(40, 30))
  (root / "in.png").write_bytes(data)
  (outside / "secret.png").write_bytes(data)
  os.symlink(outside / "secret.png", root / "link.png")
  records = [{"id": "in", "image": "in.png", "conversations": TURNS},
             {"id": "link", "image": "link.png", "conversations": TURNS},
             {"id": "up", "image": "../outside/secret.png", "conversations": TURNS}]
  path = _write_json(tmp_path, records)
  prepared = _prepare(path, image_root=str(root))
  assert prepared.num_examples == 1
  assert prepared.report.reason_counts == {"image_bad_path": 2}
  assert sorted(prepared.report.skipped_ids) == ["link", "up"]
  assert all("outside data.image_root" in r for _, r in prepared.report.skipped)
  allowed = _prepare(path, image_root=str(root), allow_images_outside_root=True)
  assert allowed.num_examples == 3
  # The transform holds the same root: a record that escaped validation is an empty row.
  unchecked = _prepare(path, image_root=str(root), validate=False)
  assert unchecked.encoder(unchecked.source[0])[1]["valid"]
  assert not unchecked.encoder(unchecked.source[1])[1]["valid"]
  with pytest.raises(ValueError, match=r"image_too_large: 3"):
    _prepare(path, image_root=str(root), max_image_bytes=len(data) - 1,
             allow_images_outside_root=True)
  for mode in ("exists", "verify"):
    kind, reason = images.image_problem(
        str(root / "in.png"), mode, limits=images.ImageLimits(max_bytes=len(data) - 1))
    assert kind == "image_too_large" and "data.max_image_bytes" in reason
