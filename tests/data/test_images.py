"""Host-side image handling: loading, mean-colour square padding, master resolution."""

import io

import numpy as np
import pytest
from PIL import Image

from leo_mini_jax.data import images

MEAN = images.CLIP_MEAN_RGB


def test_clip_mean_as_llava_computes_it():
  assert MEAN == tuple(int(x * 255) for x in (0.48145466, 0.4578275, 0.40821073))


@pytest.mark.parametrize("height, width", [(3, 7), (6, 2), (4, 4)])
def test_expand_to_square_matches_a_numpy_reference(height, width):
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
  side = max(height, width)
  ref = np.empty((side, side, 3), np.uint8)
  ref[:] = MEAN
  top, left = (side - height) // 2, (side - width) // 2
  ref[top:top + height, left:left + width] = pixels
  out = images.expand_to_square(Image.fromarray(pixels), MEAN)
  np.testing.assert_array_equal(np.asarray(out), ref)


def test_master_resolution_pads_with_mean_then_resizes():
  wide = np.zeros((20, 60, 3), np.uint8)
  wide[:] = (200, 10, 10)
  out = images.to_master_resolution(wide, 30, MEAN)
  assert out.dtype == np.uint8 and out.shape == (30, 30, 3)
  # The 60×60 square has mean-colour bands of 20 rows above and below: 10 rows at 30 px.
  np.testing.assert_array_equal(out[:8].reshape(-1, 3), np.tile(MEAN, (8 * 30, 1)))
  np.testing.assert_array_equal(out[-8:].reshape(-1, 3), np.tile(MEAN, (8 * 30, 1)))
  np.testing.assert_array_equal(out[12:18].reshape(-1, 3), np.tile((200, 10, 10), (180, 1)))
  # Bicubic, not nearest: the band edge gets blended values.
  edge = out[9:11, 15, 0]
  assert np.any((edge > MEAN[0]) & (edge < 200))


def test_sources_agree_and_modes_convert(tmp_path):
  rng = np.random.default_rng(1)
  rgb = rng.integers(0, 256, size=(9, 9, 3), dtype=np.uint8)
  path = tmp_path / "x.png"
  Image.fromarray(rgb).save(path)
  data = path.read_bytes()
  for source in (rgb, str(path), path, data, Image.fromarray(rgb)):
    np.testing.assert_array_equal(images.to_master_resolution(source, 9), rgb)
  gray = Image.fromarray(rgb[..., 0])
  np.testing.assert_array_equal(np.asarray(images.load_image(gray)),
                                np.repeat(rgb[..., :1], 3, axis=-1))
  rgba = np.concatenate([rgb, np.full((9, 9, 1), 255, np.uint8)], -1)
  np.testing.assert_array_equal(np.asarray(images.load_image(rgba)), rgb)


def test_errors_name_the_file(tmp_path):
  with pytest.raises(OSError, match="missing.png"):
    images.load_image(str(tmp_path / "missing.png"))
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"not an image at all")
  with pytest.raises(OSError, match="bad.png"):
    images.load_image(str(bad))
  with pytest.raises(OSError, match="cannot decode image bytes"):
    images.load_image(b"\x89PNG garbage")


def test_check_image_file(tmp_path):
  good = tmp_path / "good.png"
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(good)
  assert images.check_image_file(str(good)) is None
  assert "not found" in images.check_image_file(str(tmp_path / "nope.png"))
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"garbage bytes")
  assert "unreadable" in images.check_image_file(str(bad))
  assert images.check_image_file(str(bad), mode="exists") is None
  # A PNG whose pixel data is corrupted fails the chunk-CRC walk of verify().
  buf = io.BytesIO()
  Image.fromarray(np.arange(300, dtype=np.uint8).reshape(10, 10, 3)).save(buf, "PNG")
  corrupt = bytearray(buf.getvalue())
  idat = corrupt.find(b"IDAT")
  corrupt[idat + 10] ^= 0xFF
  (tmp_path / "corrupt.png").write_bytes(bytes(corrupt))
  assert "unreadable" in images.check_image_file(str(tmp_path / "corrupt.png"))


@pytest.mark.parametrize("width,height", [(40, 20), (20, 37), (33, 33), (7, 50)])
def test_crop_matches_the_clip_image_processor(width, height):
  """aspect='crop' is EAGLE/LLaVA pre-training's path: HF CLIPImageProcessor with
  shortest_edge = crop size (resize, centre crop), before rescaling/normalising."""
  transformers = pytest.importorskip("transformers")
  pixels = np.random.default_rng(width).integers(0, 256, (height, width, 3)).astype(np.uint8)
  processor = transformers.CLIPImageProcessor(
      size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, do_rescale=False,
      do_normalize=False)
  want = processor.preprocess(Image.fromarray(pixels), return_tensors="np")[
      "pixel_values"][0].transpose(1, 2, 0).astype(np.int64)
  got = images.to_master_resolution(pixels, 16, aspect="crop")
  assert got.shape == (16, 16, 3) and got.dtype == np.uint8
  # Same geometry; bicubic rounding may differ by one level between resize backends.
  assert np.abs(got.astype(np.int64) - want).max() <= 1
  assert np.mean(got != want) < 0.01


def test_crop_drops_the_sides_and_pad_keeps_them():
  # 40 × 20: left quarter red, right quarter blue, middle green.
  pixels = np.zeros((20, 40, 3), np.uint8)
  pixels[:, :10] = (255, 0, 0)
  pixels[:, 10:30] = (0, 255, 0)
  pixels[:, 30:] = (0, 0, 255)
  crop = images.to_master_resolution(pixels, 20, aspect="crop")
  assert (crop == (0, 255, 0)).all()  # the centre 20 × 20 of the unresized image
  pad = images.to_master_resolution(pixels, 20, aspect="pad")
  assert tuple(pad[0, 10]) == images.CLIP_MEAN_RGB and pad[10, 0, 0] > 200
  with pytest.raises(ValueError, match="data.image_aspect"):
    images.to_master_resolution(pixels, 20, aspect="stretch")


def test_stage_defaults_crop_in_stage_1_and_pad_after():
  from configs import leo_mini_llama3_8b  # pylint: disable=g-import-not-at-top
  assert [leo_mini_llama3_8b.get_config(f"stage={s}").data.image_aspect
          for s in (1, 2, 3)] == ["crop", "pad", "pad"]
