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

Image files are read through one function, `read_image_file`, with the limits of
`ImageLimits` (the data.max_image_* fields): only regular files (a FIFO would block the
read, a link to /dev/zero would be read until memory runs out), at most `max_bytes`, and
inside `root` (data.image_root) unless `allow_outside_root`. Thin images are bounded by
`max_aspect_ratio`, and neither path allocates more than about _MAX_CANVAS_SIDE² pixels
whatever the shape (a 1×60000 PNG of 315 bytes would otherwise ask for a 60000² canvas).
"""

import dataclasses
import io
import os
import stat
from typing import Any, Sequence

from etils import epath
import numpy as np
from PIL import Image

CLIP_MEAN_RGB = (122, 116, 104)  # int(x * 255) of CLIP's image mean, as LLaVA computes it
# Largest image (width × height) accepted. LLaVA's images are ~1 Mpx; anything far larger
# is a decompression bomb or a mistake, and decoding it would take gigabytes. Below PIL's
# own 89 Mpx warning threshold, so our check always speaks first.
MAX_IMAGE_PIXELS = 1 << 26
# Longest side / shortest side. Padded to square, a 1:20 image keeps 1/20 of the master
# resolution across (17 px at 336); beyond that almost nothing of it is left to see.
# LLaVA-665K's photos (COCO, GQA, VG, TextVQA) and book covers (OCR-VQA) are under ~3;
# tall infographics (InfographicVQA) go further, so the bound is data.max_aspect_ratio.
MAX_ASPECT_RATIO = 20.0
MAX_IMAGE_BYTES = 1 << 26  # 64 MiB: LLaVA's JPEGs are 0.1-2 MB
# A thin image (aspect ratio over _SHRINK_ASPECT_RATIO) whose square canvas would have a
# side over _MAX_CANVAS_SIDE is shrunk to that side before padding, so its canvas stays at
# ~64 MB. Every other image is padded as it is (its output exactly pad-then-resize, as
# LLaVA's); its canvas is at most _SHRINK_ASPECT_RATIO times the decoded image, which
# data.max_image_pixels bounds. The crop path resizes only the centre of such an image.
_MAX_CANVAS_SIDE = 4096
_SHRINK_ASPECT_RATIO = 4
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
IMAGE_CHECKS = ("exists", "verify", "decode")
IMAGE_ASPECTS = ("pad", "crop")


@dataclasses.dataclass(frozen=True)
class ImageLimits:
  """What an image may be (the data.max_image_* / image_root fields)."""
  max_pixels: int = MAX_IMAGE_PIXELS
  max_aspect_ratio: float = MAX_ASPECT_RATIO
  max_bytes: int = MAX_IMAGE_BYTES
  root: str = ""  # images must resolve inside it ('' = no such check)
  allow_outside_root: bool = False


def limits_from_config(data_cfg, root: str = "") -> ImageLimits:
  """ImageLimits of the `data` config; `root` the image root to enforce ('' = none).
  Raises ValueError naming a field out of range."""
  limits = ImageLimits(
      int(data_cfg.get("max_image_pixels", MAX_IMAGE_PIXELS)),
      float(data_cfg.get("max_aspect_ratio", MAX_ASPECT_RATIO)),
      int(data_cfg.get("max_image_bytes", MAX_IMAGE_BYTES)), root,
      bool(data_cfg.get("allow_images_outside_root", False)))
  for field, value in (("max_image_pixels", limits.max_pixels),
                       ("max_aspect_ratio", limits.max_aspect_ratio),
                       ("max_image_bytes", limits.max_bytes)):
    if not 1 <= value < float("inf"):
      raise ValueError(f"data.{field} must be a finite number >= 1, got {value}")
  return limits


class ImageRefused(OSError):
  """An image the limits refuse; `kind` is the validation reason kind."""

  def __init__(self, kind: str, message: str):
    super().__init__(message)
    self.kind = kind


def _check_size(image: Image.Image, limits: ImageLimits, name: str):
  width, height = image.size
  if width < 1 or height < 1:
    raise OSError(f"image {name} has no pixels ({width}x{height})")
  if width * height > limits.max_pixels:
    raise ImageRefused("image_too_large",
                       f"image {name} is {width}x{height} = {width * height} pixels, over "
                       f"the limit of {limits.max_pixels} (data.max_image_pixels)")
  ratio = max(width, height) / min(width, height)
  if ratio > limits.max_aspect_ratio:
    raise ImageRefused("image_bad_shape",
                       f"image {name} is {width}x{height}, aspect ratio {ratio:.1f} over "
                       f"data.max_aspect_ratio={limits.max_aspect_ratio:g}")


def _file_type(mode: int) -> str:
  for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                     (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                     (stat.S_ISSOCK, "a socket")):
    if test(mode):
      return name
  return "not a regular file"


def _open_checked(path: Any, limits: ImageLimits):
  """(open binary file, size) of an image file the limits allow; raises FileNotFoundError
  or ImageRefused naming the path."""
  name = os.fspath(path)
  if "://" in name:  # gs:// and the like: object stores hold only plain objects
    file = epath.Path(name)
    if not file.is_file():
      raise FileNotFoundError(name)
    size = file.stat().length
    handle = file.open("rb")
  else:
    real = os.path.realpath(name)
    if limits.root and not limits.allow_outside_root and "://" not in limits.root:
      root = os.path.realpath(limits.root)
      if os.path.commonpath([real, root]) != root:
        raise ImageRefused("image_bad_path",
                           f"image {name} resolves to {real}, outside data.image_root "
                           f"{limits.root} (data.allow_images_outside_root=True allows it)")
    # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat on the open descriptor
    # sees what is really read, whatever links led there.
    fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
      os.close(fd)
      raise ImageRefused("image_bad_path",
                         f"image {name} is {_file_type(info.st_mode)}, not a regular file")
    size, handle = info.st_size, os.fdopen(fd, "rb")
  if size > limits.max_bytes:
    handle.close()
    raise ImageRefused("image_too_large", f"image {name} is {size} bytes, over "
                                          f"data.max_image_bytes={limits.max_bytes}")
  return handle, size


def image_file_size(path: Any, limits: ImageLimits) -> int:
  """The size in bytes of an image file the limits allow (read_image_file's checks)."""
  handle, size = _open_checked(path, limits)
  handle.close()
  return size


def read_image_file(path: Any, limits: ImageLimits) -> bytes:
  """The bytes of a local or remote (gs://, via etils.epath) image file: a regular file,
  at most limits.max_bytes, inside limits.root unless allowed. Raises FileNotFoundError
  or ImageRefused (an OSError) naming the path."""
  handle, _ = _open_checked(path, limits)
  with handle:
    data = handle.read(limits.max_bytes + 1)
  if len(data) > limits.max_bytes:  # grew since the stat
    raise ImageRefused("image_too_large", f"image {os.fspath(path)} is over "
                                          f"data.max_image_bytes={limits.max_bytes} bytes")
  return data


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


def load_image(source: Any, background_rgb: Sequence[int] = CLIP_MEAN_RGB,
               limits: ImageLimits | None = None) -> Image.Image:
  """An RGB PIL image from a path, encoded bytes, a uint8 HWC array or a PIL image.

  Paths are read by read_image_file (gs:// works as well as local files). Raises OSError
  naming the path when a file is missing, refused by `limits`, or cannot be decoded.
  """
  limits = limits or ImageLimits()
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
      _check_size(image, limits, "bytes")
      image.load()
      image = to_rgb(image, background_rgb)
    except ImageRefused:
      raise
    except Exception as e:  # PIL raises several types for corrupt data
      raise OSError(f"cannot decode image bytes: {e}") from None
    return image
  elif isinstance(source, (str, os.PathLike)):
    try:
      image = Image.open(io.BytesIO(read_image_file(source, limits)))
      _check_size(image, limits, os.fspath(source))
      image.load()
      image = to_rgb(image, background_rgb)
    except FileNotFoundError:
      raise OSError(f"image file not found: {source}") from None
    except ImageRefused:
      raise
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


def _shrink_to_side(image: Image.Image, side: int) -> Image.Image:
  """`image` with its long side at most `side` (bicubic, aspect kept, sides >= 1)."""
  width, height = image.size
  longest = max(width, height)
  if longest <= side:
    return image
  size = (max(1, round(width * side / longest)), max(1, round(height * side / longest)))
  return image.resize(size, Image.Resampling.BICUBIC)


def resize_and_center_crop(image: Image.Image, resolution: int) -> Image.Image:
  """The CLIP image processor's square path: shortest side → `resolution` (bicubic, the
  long side truncated to an integer as HF computes it), then the centre square, its
  offset rounded down. When the resized long side would exceed _MAX_CANVAS_SIDE (a thin
  image), only the source region of that square is resized (PIL's `box`), so the long
  strip is never allocated."""
  width, height = image.size
  if width <= height:
    size = (resolution, int(resolution * height / width))
  else:
    size = (int(resolution * width / height), resolution)
  left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
  if max(size) > max(_MAX_CANVAS_SIDE, resolution):
    sx, sy = width / size[0], height / size[1]
    box = (left * sx, top * sy, (left + resolution) * sx, (top + resolution) * sy)
    return image.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box)
  if size != image.size:
    image = image.resize(size, Image.Resampling.BICUBIC)
  return image.crop((left, top, left + resolution, top + resolution))


def check_image_aspect(aspect: str) -> str:
  if aspect not in IMAGE_ASPECTS:
    raise ValueError(f"data.image_aspect must be one of {IMAGE_ASPECTS}, got {aspect!r}")
  return aspect


def to_master_resolution(source: Any, resolution: int,
                         background_rgb: Sequence[int] = CLIP_MEAN_RGB,
                         aspect: str = "pad", limits: ImageLimits | None = None
                         ) -> np.ndarray:
  """Load → uint8 [S, S, 3]. aspect='pad': pad to square with `background_rgb`, bicubic
  resize; 'crop': resize the shortest side and cut the centre (resize_and_center_crop).

  A thin image whose square canvas would have a side over _MAX_CANVAS_SIDE is shrunk to
  that side before padding (the result then differs from pad-then-resize by a few levels
  of resampling); every other image is padded as it is."""
  image = load_image(source, background_rgb, limits)
  if check_image_aspect(aspect) == "crop":
    return np.asarray(resize_and_center_crop(image, resolution), dtype=np.uint8)
  width, height = image.size
  if max(width, height) ** 2 > _SHRINK_ASPECT_RATIO * width * height:
    image = _shrink_to_side(image, max(_MAX_CANVAS_SIDE, resolution))
  image = expand_to_square(image, background_rgb)
  if image.size != (resolution, resolution):
    image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
  return np.asarray(image, dtype=np.uint8)


def image_problem(source: Any, mode: str = "verify", max_pixels: int = MAX_IMAGE_PIXELS,
                  limits: ImageLimits | None = None) -> tuple[str, str] | None:
  """None if the image file (path) or encoded bytes look usable, else (kind, reason).

  kind is 'image_missing', 'image_empty', 'image_too_large', 'image_bad_shape' (aspect
  ratio), 'image_bad_path' (not a regular file, or outside the image root) or
  'image_unreadable'. `limits` (default: ImageLimits(max_pixels)) bound the file and
  the image. Modes:
    exists  only checks that the file is there, a regular file, allowed and not empty;
    verify  also reads the header (format, mode, size against the limits, which stops
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
  limits = limits or ImageLimits(max_pixels=max_pixels)
  if isinstance(source, (bytes, bytearray)):
    name, data = "bytes", bytes(source)
    if not data:
      return "image_empty", "empty image bytes"
  else:
    name = os.fspath(source)
    try:
      if mode == "exists":
        size = image_file_size(source, limits)
        return None if size else ("image_empty", f"empty image file: {name}")
      data = read_image_file(source, limits)
    except FileNotFoundError:
      return "image_missing", f"image file not found: {name}"
    except ImageRefused as e:
      return e.kind, str(e)
    except OSError as e:
      return "image_unreadable", f"cannot read image {name}: {e}"
    if not data:
      return "image_empty", f"empty image file: {name}"
  if mode == "exists":
    return None
  try:
    with Image.open(io.BytesIO(data)) as image:
      _check_size(image, limits, name)
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
  except ImageRefused as e:
    return e.kind, str(e)
  except Exception as e:  # PIL raises several types for corrupt data; MemoryError too
    return "image_unreadable", f"unreadable image {name}: {type(e).__name__}: {e}"
  return None


def check_image_file(path: str, mode: str = "verify", max_pixels: int = MAX_IMAGE_PIXELS,
                     limits: ImageLimits | None = None) -> str | None:
  """None if the file at `path` looks usable, else the reason it is not (image_problem)."""
  problem = image_problem(path, mode, max_pixels, limits)
  return None if problem is None else problem[1]
