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
