"""Host-side image handling: load, pad to square with the mean colour, resize once.

The host sends every image at one master resolution as uint8 RGB; each vision expert
resizes and normalises on device. Padding follows LLaVA's `expand2square`: the image is
centred on a square canvas filled with the image processor's mean colour (CLIP's mean
(0.48145466, 0.4578275, 0.40821073) × 255 → (122, 116, 104) by default), so the padding
normalises to ~0 for the experts.

`aspect='crop'` is the other reference path: EAGLE's and LLaVA's pre-training
(`image_aspect_ratio` left at 'square') give the image straight to the CLIP-style image
processor, which resizes the shortest side to the crop size (bicubic) and cuts the centre
square, dropping the sides of non-square images; their SFT stages pad ('pad').
"""

import io
import os
from typing import Any, Sequence

from etils import epath
import numpy as np
from PIL import Image

CLIP_MEAN_RGB = (122, 116, 104)  # int(x * 255) of CLIP's image mean, as LLaVA computes it
# Largest image (width × height) accepted. LLaVA's images are ~1 Mpx; anything far larger
# is a decompression bomb or a mistake, and decoding it would take gigabytes. Below PIL's
# own 89 Mpx warning threshold, so our check always speaks first.
MAX_IMAGE_PIXELS = 1 << 26
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
IMAGE_CHECKS = ("exists", "verify", "decode")
IMAGE_ASPECTS = ("pad", "crop")


def _check_size(image: Image.Image, max_pixels: int, name: str):
  width, height = image.size
  if width < 1 or height < 1:
    raise OSError(f"image {name} has no pixels ({width}x{height})")
  if width * height > max_pixels:
    raise OSError(f"image {name} is {width}x{height} = {width * height} pixels, over the "
                  f"limit of {max_pixels} (data.max_image_pixels)")


def to_rgb(image: Image.Image, background_rgb: Sequence[int] = CLIP_MEAN_RGB
           ) -> Image.Image:
  """Any PIL mode as 8-bit RGB, without silently wrong pixels.

  16-bit grey (PNG 'I;16', or 'I' holding 0..65535) keeps its top 8 bits: a plain
  convert('RGB') would clip every value above 255 to white. Transparent images (RGBA,
  LA, P with transparency) are composited over `background_rgb`, the padding colour, so
  transparent pixels normalise to ~0 like the padding. Float images ('F') are refused:
  their value range is not defined by the format.
  """
  mode = image.mode
  if mode == "RGB":
    return image
  if mode in _SIXTEEN_BIT_MODES:
    values = np.asarray(image).astype(np.int64)
    grey = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")
  if mode == "F":
    raise OSError("floating-point image (mode 'F') is not supported")
  if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
      mode == "P" and "transparency" in image.info):
    rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, tuple(int(c) for c in background_rgb) + (255,))
    return Image.alpha_composite(canvas, rgba).convert("RGB")
  return image.convert("RGB")


def _open_path(path: Any) -> Image.Image:
  """Opens and decodes a local or remote (gs://, via etils.epath) image file."""
  with epath.Path(path).open("rb") as f:
    data = f.read()
  image = Image.open(io.BytesIO(data))
  return image


def load_image(source: Any, background_rgb: Sequence[int] = CLIP_MEAN_RGB,
               max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
  """An RGB PIL image from a path, encoded bytes, a uint8 HWC array or a PIL image.

  Paths go through etils.epath, so gs:// works as well as local files. Raises OSError
  naming the path when a file is missing, cannot be decoded or is over `max_pixels`.
  """
  if isinstance(source, Image.Image):
    image = source
  elif isinstance(source, np.ndarray):
    if source.dtype != np.uint8 or source.ndim != 3 or source.shape[-1] not in (3, 4):
      raise ValueError(f"image array must be uint8 HWC RGB(A), got {source.dtype} "
                       f"{source.shape}")
    image = Image.fromarray(source)
  elif isinstance(source, (bytes, bytearray)):
    try:
      image = Image.open(io.BytesIO(source))
      _check_size(image, max_pixels, "bytes")
      image.load()
      image = to_rgb(image, background_rgb)
    except Exception as e:  # PIL raises several types for corrupt data
      raise OSError(f"cannot decode image bytes: {e}") from None
    return image
  elif isinstance(source, (str, os.PathLike)):
    try:
      image = _open_path(source)
      _check_size(image, max_pixels, os.fspath(source))
      image.load()
      image = to_rgb(image, background_rgb)
    except FileNotFoundError:
      raise OSError(f"image file not found: {source}") from None
    except Exception as e:
      raise OSError(f"cannot decode image {source}: {e}") from None
    return image
  else:
    raise TypeError(f"unsupported image source type {type(source).__name__}")
  return to_rgb(image, background_rgb)


def expand_to_square(image: Image.Image, background_rgb: Sequence[int]) -> Image.Image:
  """LLaVA's expand2square: centre `image` on a square canvas of `background_rgb`."""
  width, height = image.size
  if width == height:
    return image
  side = max(width, height)
  canvas = Image.new(image.mode, (side, side), tuple(int(c) for c in background_rgb))
  canvas.paste(image, ((side - width) // 2, (side - height) // 2))
  return canvas


def resize_and_center_crop(image: Image.Image, resolution: int) -> Image.Image:
  """The CLIP image processor's square path: shortest side → `resolution` (bicubic, the
  long side truncated to an integer as HF computes it), then the centre square, its
  offset rounded down."""
  width, height = image.size
  if width <= height:
    size = (resolution, int(resolution * height / width))
  else:
    size = (int(resolution * width / height), resolution)
  if size != image.size:
    image = image.resize(size, Image.Resampling.BICUBIC)
  left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
  return image.crop((left, top, left + resolution, top + resolution))


def check_image_aspect(aspect: str) -> str:
  if aspect not in IMAGE_ASPECTS:
    raise ValueError(f"data.image_aspect must be one of {IMAGE_ASPECTS}, got {aspect!r}")
  return aspect


def to_master_resolution(source: Any, resolution: int,
                         background_rgb: Sequence[int] = CLIP_MEAN_RGB,
                         aspect: str = "pad") -> np.ndarray:
  """Load → uint8 [S, S, 3]. aspect='pad': pad to square with `background_rgb`, bicubic
  resize; 'crop': resize the shortest side and cut the centre (resize_and_center_crop)."""
  image = load_image(source, background_rgb)
  if check_image_aspect(aspect) == "crop":
    return np.asarray(resize_and_center_crop(image, resolution), dtype=np.uint8)
  image = expand_to_square(image, background_rgb)
  if image.size != (resolution, resolution):
    image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
  return np.asarray(image, dtype=np.uint8)


def image_problem(source: Any, mode: str = "verify",
                  max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[str, str] | None:
  """None if the image file (path) or encoded bytes look usable, else (kind, reason).

  kind is 'image_missing', 'image_empty', 'image_too_large' or 'image_unreadable'.
  Modes:
    exists  only checks that the file is there and not empty;
    verify  also reads the header (format, mode, size against `max_pixels`, which stops
            decompression bombs before any pixel is decoded) and the structure: PNG
            through PIL's verify() (every chunk CRC up to IEND, so a cut file fails);
            JPEG by decoding at 1/8 scale (PIL's draft mode decodes the DCT at reduced
            size, several times faster than a full decode, and still reads the whole
            entropy-coded stream, so a truncated file fails); other formats by a full
            decode;
    decode  fully decodes every image (slowest, exact).
  """
  if mode not in IMAGE_CHECKS:
    raise ValueError(f"data.image_check must be one of {IMAGE_CHECKS}, got {mode!r}")
  if isinstance(source, (bytes, bytearray)):
    name, data = "bytes", bytes(source)
    if not data:
      return "image_empty", "empty image bytes"
  else:
    name = os.fspath(source)
    path = epath.Path(source)
    try:
      if not path.is_file():
        return "image_missing", f"image file not found: {name}"
      if mode == "exists":
        return None if path.stat().length else ("image_empty", f"empty image file: {name}")
      data = path.read_bytes()
    except OSError as e:
      return "image_unreadable", f"cannot read image {name}: {e}"
    if not data:
      return "image_empty", f"empty image file: {name}"
  if mode == "exists":
    return None
  try:
    with Image.open(io.BytesIO(data)) as image:
      _check_size(image, max_pixels, name)
      if image.mode == "F":
        return "image_unreadable", f"unsupported image {name}: floating-point mode 'F'"
      if mode == "decode":
        image.load()
      elif image.format == "PNG":
        image.verify()
      elif image.format == "JPEG":
        image.draft("RGB", (max(1, image.size[0] // 8), max(1, image.size[1] // 8)))
        image.load()
      else:
        image.load()
  except Image.DecompressionBombError as e:
    return "image_too_large", f"image {name}: {e}"
  except OSError as e:
    if "data.max_image_pixels" in str(e):
      return "image_too_large", str(e)
    return "image_unreadable", f"unreadable image {name}: {type(e).__name__}: {e}"
  except Exception as e:  # PIL raises several types for corrupt data
    return "image_unreadable", f"unreadable image {name}: {type(e).__name__}: {e}"
  return None


def check_image_file(path: str, mode: str = "verify",
                     max_pixels: int = MAX_IMAGE_PIXELS) -> str | None:
  """None if the file at `path` looks usable, else the reason it is not (image_problem)."""
  problem = image_problem(path, mode, max_pixels)
  return None if problem is None else problem[1]
