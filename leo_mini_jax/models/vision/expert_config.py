"""What every vision expert's config dataclass shares (the registry's side of the contract).

Each expert's config is a frozen dataclass that subclasses `ExpertConfig`; the registry
(experts.py) reads `input_size`, `mean`, `std`, `output_grid` and `feature_dim`. The
defaults here fit a patch-embedding ViT (`image_size`, `patch_size`, `hidden_size`
fields); experts whose token grid or width differ override the property.

`ExpertConfig` holds the fields every tower has that say how it computes, not what its
weights are (dtypes, rematerialisation); they come after a subclass's own fields.
"""

import dataclasses
from typing import Any

import jax.numpy as jnp

from leo_mini_jax import config_utils

# The ImageNet-style normalisation of OpenAI CLIP, which the CLIP-trained towers share.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class ExpertConfig:
  """Base of the experts' frozen config dataclasses."""
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False   # rematerialise each block (encoder layer) in the backward pass

  @classmethod
  def from_config(cls, cfg: Any, **overrides: Any):
    """From a dict / ConfigDict; unknown fields fail by name."""
    return config_utils.from_config(cls, cfg, **overrides)

  @property
  def input_size(self) -> int:
    """The square side the tower runs at."""
    return self.image_size

  @property
  def dtypes(self) -> tuple[Any, Any]:
    """(compute dtype, parameter dtype), as the `models.layers` builders take them."""
    return jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)

  @property
  def output_grid(self) -> tuple[int, int]:
    side = self.image_size // self.patch_size
    return side, side

  @property
  def feature_dim(self) -> int:
    return self.hidden_size

  def check_vit_sizes(self, *image_fields: str) -> None:
    """Raises ValueError unless each of `image_fields` (default: image_size) is a
    multiple of patch_size and hidden_size splits into num_heads heads."""
    name = type(self).__name__
    for field in image_fields or ("image_size",):
      size = getattr(self, field)
      if size % self.patch_size:
        raise ValueError(
            f"{name}.{field}={size} is not a multiple of patch_size={self.patch_size}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"{name}.hidden_size={self.hidden_size} is not divisible by "
                       f"num_heads={self.num_heads}")

  def check_normalisation(self) -> None:
    """Raises ValueError unless mean and std hold one value per RGB channel."""
    if len(self.mean) != 3 or len(self.std) != 3:
      raise ValueError(f"{type(self).__name__}.mean/std need 3 values, got "
                       f"{self.mean} / {self.std}")
