"""Host-side image handling: load, pad to square with the mean colour, resize once.

The host sends every image at one master resolution as uint8 RGB; each vision expert
resizes and normalises on device. Padding follows LLaVA's `expand2square`: the image is
centred on a square canvas filled with the image processor's mean colour (CLIP's mean
(0.48145466, 0.4578275, 0.40821073) × 255 → (122, 116, 104) by default), so the padding
normalises to ~0 for the experts.
"""

import io
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

CLIP_MEAN_RGB = (122, 116, 104)  # int(x * 255) of CLIP's image mean, as LLaVA computes it


def load_image(source: Any) -> Image.Image:
  """An RGB PIL image from a path, encoded bytes, a uint8 HWC array or a PIL image.

  Raises OSError naming the path when a file is missing or cannot be decoded.
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
      image.load()
    except Exception as e:  # PIL raises several types for corrupt data
      raise OSError(f"cannot decode image bytes: {e}") from None
  elif isinstance(source, (str, os.PathLike)):
    try:
      image = Image.open(source)
      image.load()
    except FileNotFoundError:
      raise OSError(f"image file not found: {source}") from None
    except Exception as e:
      raise OSError(f"cannot decode image {source}: {e}") from None
  else:
    raise TypeError(f"unsupported image source type {type(source).__name__}")
  return image if image.mode == "RGB" else image.convert("RGB")


def expand_to_square(image: Image.Image, background_rgb: Sequence[int]) -> Image.Image:
  """LLaVA's expand2square: centre `image` on a square canvas of `background_rgb`."""
  width, height = image.size
  if width == height:
    return image
  side = max(width, height)
  canvas = Image.new(image.mode, (side, side), tuple(int(c) for c in background_rgb))
  canvas.paste(image, ((side - width) // 2, (side - height) // 2))
  return canvas


def to_master_resolution(source: Any, resolution: int,
                         background_rgb: Sequence[int] = CLIP_MEAN_RGB) -> np.ndarray:
  """Load → pad to square with `background_rgb` → bicubic resize → uint8 [S, S, 3]."""
  image = expand_to_square(load_image(source), background_rgb)
  if image.size != (resolution, resolution):
    image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
  return np.asarray(image, dtype=np.uint8)


def check_image_file(path: str, mode: str = "verify") -> str | None:
  """None if the file at `path` looks usable, else the reason it is not.

  mode 'exists' only checks the file; 'verify' also runs PIL's `verify()`, which reads
  the header and walks the file's structure (PNG chunk CRCs) without decoding pixels —
  cheap enough for a start-up scan. A file that passes 'verify' can still fail to decode
  later; the pipeline's per-record transform handles that without stopping.
  """
  if not os.path.isfile(path):
    return f"image file not found: {path}"
  if mode == "exists":
    return None
  if mode != "verify":
    raise ValueError(f"image check mode must be 'exists' or 'verify', got {mode!r}")
  try:
    with Image.open(path) as image:
      image.verify()
  except Exception as e:  # PIL raises several types for corrupt data
    return f"unreadable image {path}: {type(e).__name__}: {e}"
  return None
