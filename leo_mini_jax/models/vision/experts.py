"""The vision-expert registry and the uint8 → features wrapper.

MMoE-Vision: docs/design.md §2.1.

An expert is registered once by name with its config dataclass, its tower module and
what the rest of the code needs to know about it beyond the tower:

    register_expert("eva02", Eva02Config, Eva02Tower, port="leo_mini_jax.porting.eva02",
                    eagle_towers=("det-1024",))

`port` is the module path of its weight port (`porting.expert_port.ExpertPort`), named
as a string so that importing the model never imports the porting code (or torch).
`eagle_towers` are the `mm_vision_tower` names an EAGLE release gives it. `fresh` is a
regex, relative to the tower, of parameters that the tower adds on top of its reference
checkpoint (SAM's EAGLE neck): a port leaves them out, stage 1 initialises them.

The config declares what the rest of the model needs through properties:
`input_size` (square side the tower runs at), `mean`/`std` (per-channel, on [0, 1]
pixels), `output_grid` (h, w of the token grid) and `feature_dim`. The tower takes
normalised NHWC float pixels `[B, input_size, input_size, 3]` and returns `[B, h·w, D]`.

`VisionExpert` wraps a tower for the LEO-MINI model: it takes the model's single uint8
master-resolution batch `[B, S, S, 3]`, resizes it on device to the expert's input size,
scales to [0, 1], normalises and runs the tower. The tower shares the wrapper's scope,
so inside LeoMini the tower's parameters sit directly at `vision/<name>/...`, the same
tree a weight port of that tower produces.

Resizing is bilinear (`jax.image.resize`, antialiased when downscaling, i.e. a triangle
filter stretched by the scale factor, as PIL's BILINEAR). The reference processors
resize each expert's input from the original image on the host with PIL bicubic; doing
it on device from one master image keeps one uint8 batch on the wire, and bilinear
with antialiasing is the kernel that neither rings nor aliases at the large
1024 → 336 reduction. The differences to the reference pixels are small interpolation
differences, not a change of the input distribution.
"""

import dataclasses
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from leo_mini_jax import config_utils
from leo_mini_jax.models.vision import positions
from leo_mini_jax.models.vision.clip import ClipConfig, ClipVisionTower
from leo_mini_jax.models.vision.convnext import ConvNextConfig, ConvNextTower
from leo_mini_jax.models.vision.eva02 import Eva02Config, Eva02Tower
from leo_mini_jax.models.vision.pix2struct import Pix2StructConfig, Pix2StructTower
from leo_mini_jax.models.vision.sam import SamConfig, SamVisionTower


@dataclasses.dataclass(frozen=True)
class ExpertSpec:
  """A registered expert: how to configure and build its tower."""
  name: str
  config_cls: type
  module_cls: type
  port: str                           # module path of the weight port
  eagle_towers: tuple[str, ...] = ()  # EAGLE's mm_vision_tower names for it
  fresh: str | None = None            # regex (under vision/<name>/) new on the checkpoint


@dataclasses.dataclass(frozen=True)
class ExpertInfo:
  """What the model reads to size CoTR and the projector for one expert."""
  name: str
  input_size: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  output_grid: tuple[int, int]
  feature_dim: int

  @property
  def num_tokens(self) -> int:
    return self.output_grid[0] * self.output_grid[1]


_REGISTRY: dict[str, ExpertSpec] = {}


def register_expert(name: str, config_cls: type, module_cls: type, *, port: str,
                    eagle_towers: Sequence[str] = (), fresh: str | None = None) -> None:
  """Adds an expert; its config must have input_size, mean, std, output_grid, feature_dim.

  See the module docstring for `port`, `eagle_towers` and `fresh`.
  """
  if name in _REGISTRY:
    raise ValueError(f"vision expert {name!r} is already registered")
  claimed = eagle_tower_experts()
  for tower in eagle_towers:
    if tower in claimed:
      raise ValueError(f"vision expert {name!r}: EAGLE tower {tower!r} is already "
                       f"registered for {claimed[tower]!r}")
  if fresh is not None:
    re.compile(fresh)  # a typo fails here, not in a later stage's checkpoint load
  _REGISTRY[name] = ExpertSpec(name, config_cls, module_cls, port, tuple(eagle_towers), fresh)


def registered_experts() -> tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


def expert_spec(name: str) -> ExpertSpec:
  if name not in _REGISTRY:
    raise ValueError(
        f"unknown vision expert {name!r}; registered experts are {registered_experts()}")
  return _REGISTRY[name]


def port_modules() -> dict[str, str]:
  """Expert name → the module path of its weight port."""
  return {name: spec.port for name, spec in sorted(_REGISTRY.items())}


def eagle_tower_experts() -> dict[str, str]:
  """EAGLE's tower names (mm_vision_tower entries) → expert names."""
  return {tower: name for name, spec in sorted(_REGISTRY.items())
          for tower in spec.eagle_towers}


def fresh_params() -> str:
  """A regex over model parameter paths (`vision/<name>/...`) of every expert's parameters
  that are new on top of its checkpoint; one that matches nothing when no expert has any."""
  patterns = [f"vision/{name}/{spec.fresh}" for name, spec in sorted(_REGISTRY.items())
              if spec.fresh is not None]
  return "|".join(patterns) or r"$^"


_PORTS = "leo_mini_jax.porting."
register_expert("clip", ClipConfig, ClipVisionTower, port=_PORTS + "clip",
                eagle_towers=("clip-448", "clip-336", "clip-224"))
register_expert("convnext", ConvNextConfig, ConvNextTower, port=_PORTS + "convnext",
                eagle_towers=("convnext-1024",))
register_expert("eva02", Eva02Config, Eva02Tower, port=_PORTS + "eva02",
                eagle_towers=("det-1024",))
register_expert("pix2struct", Pix2StructConfig, Pix2StructTower, port=_PORTS + "pix2struct",
                eagle_towers=("pix2struct-1024",))
# EAGLE's short neck (conv1 + layer_norm1) is not part of a SAM checkpoint.
register_expert("sam", SamConfig, SamVisionTower, port=_PORTS + "sam",
                eagle_towers=("sam-1024",), fresh="eagle_neck/.*")


def expert_info(name: str, config: Any) -> ExpertInfo:
  return ExpertInfo(
      name=name, input_size=int(config.input_size), mean=tuple(config.mean),
      std=tuple(config.std), output_grid=tuple(config.output_grid),
      feature_dim=int(config.feature_dim))


IMAGE_RESIZES = ("antialias", "eagle")


def preprocess_images(images: jax.Array, size: int, mean: Sequence[float],
                      std: Sequence[float], resize: str = "antialias") -> jax.Array:
  """uint8 [B, S, S, 3] → float32 [B, size, size, 3], (x/255 − mean) / std.

  Resize (none when size == S): 'antialias' is bilinear, antialiased when size < S;
  'eagle' is EAGLE's torch `F.interpolate(mode='bilinear', align_corners=True)` (no
  antialias), for models trained or released with EAGLE's preprocessing.
  """
  if resize not in IMAGE_RESIZES:
    raise ValueError(f"image resize {resize!r}: expected one of {IMAGE_RESIZES}")
  x = images.astype(jnp.float32) / 255.0
  batch, height, width, channels = x.shape
  if (height, width) != (size, size) and resize == "eagle":
    x = positions.resize_bilinear_align_corners(x, (size, size))
  elif (height, width) != (size, size):
    x = jax.image.resize(x, (batch, size, size, channels), method="bilinear", antialias=True)
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (x - mean) / std


class VisionExpert(nn.Module):
  """uint8 master images [B, S, S, 3] → expert features [B, h·w, D].

  `expert` is the registry name, `config` that expert's config dataclass. The tower's
  parameters live in this module's own scope (no extra nesting level).
  """
  expert: str
  config: Any
  image_resize: str = "antialias"  # see preprocess_images

  def setup(self):
    spec = expert_spec(self.expert)
    if not isinstance(self.config, spec.config_cls):
      raise TypeError(f"VisionExpert({self.expert!r}): config must be a "
                      f"{spec.config_cls.__name__}, got {type(self.config).__name__}")
    self.tower = spec.module_cls(self.config)
    nn.share_scope(self, self.tower)

  @property
  def info(self) -> ExpertInfo:
    return expert_info(self.expert, self.config)

  def __call__(self, images: jax.Array) -> jax.Array:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"VisionExpert({self.expert!r}): expected images [B, S, S, 3], "
                       f"got shape {images.shape}")
    cfg = self.config
    pixels = preprocess_images(images, cfg.input_size, cfg.mean, cfg.std, self.image_resize)
    return self.tower(pixels)


def build_expert(name: str, cfg: Any, module_name: str | None = None
                 ) -> tuple[VisionExpert, ExpertInfo]:
  """Builds one expert from its registry name and config (dict/ConfigDict/dataclass).

  `cfg` may still hold a 'name' key equal to `name`. The module is unbound; give it a
  Flax name with `module_name` (default: the expert's name).
  """
  spec = expert_spec(name)
  if not isinstance(cfg, spec.config_cls):
    fields = dict(config_utils.to_plain(cfg) if cfg is not None else {})
    given = fields.pop("name", name)
    if given != name:
      raise ValueError(f"build_expert({name!r}): config names expert {given!r}")
    cfg = spec.config_cls.from_config(fields)
  module = VisionExpert(expert=name, config=cfg, name=module_name or name)
  return module, expert_info(name, cfg)


def build_experts(expert_cfgs: Sequence[Mapping[str, Any]]
                  ) -> tuple[tuple[VisionExpert, ...], tuple[ExpertInfo, ...]]:
  """Builds every expert of `cfg.vision.experts`, in order.

  Each entry is a dict / ConfigDict with `name` ('clip', 'convnext', ...) plus fields of
  that expert's config. Each module is named after its expert (parameters at
  `<parent>/<name>/...`), so a name may appear only once. As with any Flax submodule,
  call this inside the parent's `setup()` or `@nn.compact` method so that the modules
  bind to that parent.

  Returns:
    (modules, infos), both in the order of `expert_cfgs`.
  """
  modules, infos, seen = [], [], set()
  for i, entry in enumerate(expert_cfgs):
    fields = config_utils.to_plain(entry)
    if not isinstance(fields, Mapping) or "name" not in fields:
      raise ValueError(f"vision.experts[{i}]: needs a 'name' key, one of {registered_experts()}")
    name = fields["name"]
    if name in seen:
      raise ValueError(f"vision.experts[{i}]: expert {name!r} appears twice")
    seen.add(name)
    try:
      module, info = build_expert(name, fields)
    except ValueError as e:
      raise ValueError(f"vision.experts[{i}] ({name!r}): {e}") from None
    modules.append(module)
    infos.append(info)
  return tuple(modules), tuple(infos)
