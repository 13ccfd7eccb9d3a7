"""Vision-expert registry, uint8 preprocessing and the VisionExpert wrapper."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from leo_mini_jax.models.vision.clip import ClipConfig, ClipVisionTower
from leo_mini_jax.models.vision.convnext import ConvNextConfig
from leo_mini_jax.models.vision.experts import (build_expert, build_experts,
                                                preprocess_images, registered_experts)


@pytest.fixture(autouse=True)
def _highest_matmul_precision():
  """float32 references: keep GPUs/TPUs from running f32 matmuls in TF32/bfloat16."""
  with jax.default_matmul_precision("highest"):
    yield


CLIP = dict(name="clip", image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
            num_layers=2, num_heads=4)
CONVNEXT = dict(name="convnext", image_size=64, dims=[8, 16, 32, 64], depths=[1, 1, 2, 1])


def test_registry_lists_both_towers():
  assert {"clip", "convnext"} <= set(registered_experts())


def test_build_experts_from_dicts():
  cfgs = ml_collections.ConfigDict({"experts": [CLIP, CONVNEXT]})
  modules, infos = build_experts(cfgs.experts)
  assert [m.name for m in modules] == ["clip", "convnext"]
  assert isinstance(modules[0].config, ClipConfig)
  assert isinstance(modules[1].config, ConvNextConfig)
  assert modules[1].config.dims == (8, 16, 32, 64)
  clip, convnext = infos
  assert (clip.input_size, clip.output_grid, clip.feature_dim, clip.num_tokens) == \
      (32, (4, 4), 32, 16)
  assert (convnext.input_size, convnext.output_grid, convnext.feature_dim) == (64, (2, 2), 64)
  assert clip.mean == ClipConfig().mean and convnext.std == ConvNextConfig().std


def test_experts_run_on_uint8_batch():
  class Vision(nn.Module):
    def setup(self):
      self.experts, self.infos = build_experts([CLIP, CONVNEXT])

    def __call__(self, images):
      return [expert(images) for expert in self.experts]

  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 96, 96, 3)), jnp.uint8)
  variables = jax.jit(Vision().init)(jax.random.key(0), images)
  assert set(variables["params"]) == {"clip", "convnext"}
  # The tower's parameters sit directly under the expert's name (no wrapper level).
  assert "pre_layernorm" in variables["params"]["clip"]
  assert "stem" in variables["params"]["convnext"]
  outs = Vision().apply(variables, images)
  _, infos = build_experts([CLIP, CONVNEXT])
  for out, info in zip(outs, infos):
    assert out.shape == (2, info.num_tokens, info.feature_dim)
    assert np.all(np.isfinite(np.asarray(out)))


def test_unknown_expert_and_field_fail_clearly():
  with pytest.raises(ValueError, match=r"unknown vision expert 'dino'.*registered"):
    build_experts([CLIP, dict(name="dino")])
  with pytest.raises(ValueError, match=r"experts\[0\].*ClipConfig: unknown field.*'width'"):
    build_experts([dict(CLIP, width=3)])
  with pytest.raises(ValueError, match="needs a 'name' key"):
    build_experts([{"image_size": 32}])
  with pytest.raises(ValueError, match="appears twice"):
    build_experts([CLIP, CLIP])
  with pytest.raises(ValueError, match="names expert 'convnext'"):
    build_expert("clip", dict(CLIP, name="convnext"))


def test_preprocess_same_size_is_exact_normalisation():
  images = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
  mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
  out = preprocess_images(jnp.asarray(images), 8, mean, std)
  expected = (images / 255.0 - np.array(mean)) / np.array(std)
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


@pytest.mark.parametrize("size", [16, 13, 40])
def test_preprocess_resize_matches_pil_bilinear(size):
  image_module = pytest.importorskip("PIL.Image")
  images = np.random.default_rng(2).integers(0, 256, (1, 28, 28, 3)).astype(np.uint8)
  mean, std = (0.48, 0.45, 0.40), (0.26, 0.26, 0.27)
  out = np.asarray(preprocess_images(jnp.asarray(images), size, mean, std))
  # PIL's BILINEAR on float images: a triangle filter widened by the scale when shrinking.
  channels = [
      np.asarray(image_module.fromarray(images[0, ..., c].astype(np.float32) / 255.0, mode="F")
                 .resize((size, size), image_module.BILINEAR)) for c in range(3)]
  expected = (np.stack(channels, -1) - np.array(mean)) / np.array(std)
  np.testing.assert_allclose(out[0], expected, atol=1e-4)


def test_vision_expert_equals_tower_on_normalised_pixels():
  module, info = build_expert("clip", CLIP)
  images = np.random.default_rng(3).integers(0, 256, (2, 64, 64, 3)).astype(np.uint8)
  variables = module.init(jax.random.key(0), jnp.asarray(images))
  tower_vars = ClipVisionTower(module.config).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert jax.tree.structure(variables) == jax.tree.structure(tower_vars)

  # Exact 2× reduction: antialiased bilinear = taps (1, 3, 3, 1)/8 around each output
  # pixel, renormalised where a tap falls outside the image.
  resize = np.zeros((32, 64))
  for i in range(32):
    for tap, j in zip((1, 3, 3, 1), range(2 * i - 1, 2 * i + 3)):
      if 0 <= j < 64:
        resize[i, j] = tap
  resize /= resize.sum(1, keepdims=True)
  small = np.einsum("ih,jw,bhwc->bijc", resize, resize, images / 255.0)
  pixels = (small - np.array(info.mean)) / np.array(info.std)
  expected = ClipVisionTower(module.config).apply(variables, jnp.asarray(pixels, jnp.float32))
  out = module.apply(variables, jnp.asarray(images))
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-4)
