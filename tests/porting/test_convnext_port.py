"""timm / open_clip ConvNeXt → ConvNextTower: parity with timm `forward_features`."""

import jax.numpy as jnp
import numpy as np
import pytest

from tests.porting.conftest import randomize_, reference_libraries

torch, timm, safetensors_torch = reference_libraries("torch", "timm", "safetensors.torch")
from timm.models.convnext import ConvNeXt  # noqa: E402

from leo_mini_jax.porting import convnext as convnext_port  # noqa: E402
from leo_mini_jax.porting.mapping import PortError  # noqa: E402


DIMS, DEPTHS = (8, 16, 32, 64), (1, 1, 2, 1)


def tiny_timm(seed=0, **kwargs):
  """A timm ConvNeXt with every parameter random (gamma starts at 1e-6 otherwise)."""
  torch.manual_seed(seed)
  return randomize_(ConvNeXt(depths=DEPTHS, dims=DIMS, num_classes=10, **kwargs), seed)


def save(state, path):
  safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def timm_tokens(model, x):
  with torch.no_grad():
    features = model.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
  return features.permute(0, 2, 3, 1).reshape(x.shape[0], -1, features.shape[1]).numpy()


def pixels(size, seed=1):
  return np.random.default_rng(seed).standard_normal((2, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize("size", [64, 96])
def test_parity_xxlarge_layout(tmp_path, size):
  # convnext_xxlarge's block layout: Linear MLP, layer scale, LayerNorm eps 1e-5.
  model = tiny_timm(norm_eps=1e-5)
  save(model.state_dict(), tmp_path / "model.safetensors")
  module, params = convnext_port.load_convnext(tmp_path, image_size=size)
  cfg = module.config
  assert (cfg.depths, cfg.dims, cfg.mlp_ratio, cfg.kernel_size, cfg.patch_size) == \
      (DEPTHS, DIMS, 4.0, 7, 4)
  assert cfg.ls_init_value is not None and cfg.output_grid == (size // 32, size // 32)
  x = pixels(size)
  out = np.asarray(module.apply({"params": params}, jnp.asarray(x)))
  expected = timm_tokens(model, x)
  assert out.shape == expected.shape == (2, (size // 32) ** 2, 64)
  np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4)


def test_parity_conv_mlp_without_layer_scale(tmp_path):
  # convnext_atto-style blocks: 1×1-conv MLP (weights (out, in, 1, 1)), LayerNorm2d, timm
  # default eps 1e-6; and no gamma.
  model = tiny_timm(seed=2, conv_mlp=True, ls_init_value=None)
  assert model.stages[0].blocks[0].mlp.fc1.weight.ndim == 4
  save(model.state_dict(), tmp_path / "model.safetensors")
  module, params = convnext_port.load_convnext(tmp_path / "model.safetensors", image_size=64,
                                               layer_norm_eps=1e-6)
  assert module.config.ls_init_value is None
  x = pixels(64, seed=3)
  np.testing.assert_allclose(np.asarray(module.apply({"params": params}, jnp.asarray(x))),
                             timm_tokens(model, x), atol=1e-4, rtol=1e-4)


def test_open_clip_prefix_and_skipped_towers(tmp_path):
  model = tiny_timm(seed=4, norm_eps=1e-5)
  state = {f"visual.trunk.{k}": v for k, v in model.state_dict().items()}
  state.update({
      "visual.head.proj.weight": torch.zeros(16, 64),
      "transformer.resblocks.0.attn.in_proj_weight": torch.zeros(48, 16),
      "token_embedding.weight": torch.zeros(10, 16),
      "positional_embedding": torch.zeros(8, 16),
      "ln_final.weight": torch.zeros(16),
      "text_projection": torch.zeros(16, 16),
      "logit_scale": torch.zeros(()),
  })
  save(state, tmp_path / "open_clip_model.safetensors")
  module, params = convnext_port.load_convnext(tmp_path, image_size=64)
  x = pixels(64, seed=5)
  np.testing.assert_allclose(np.asarray(module.apply({"params": params}, jnp.asarray(x))),
                             timm_tokens(model, x), atol=1e-4, rtol=1e-4)


def test_unsupported_keys_are_reported(tmp_path):
  model = tiny_timm()
  state = dict(model.state_dict())
  state["norm_pre.weight"] = torch.ones(64)   # head_norm_first: forward_features would norm
  del state["stages.2.blocks.1.gamma"]
  save(state, tmp_path / "model.safetensors")
  with pytest.raises(PortError) as info:
    convnext_port.load_convnext(tmp_path)
  message = str(info.value)
  assert "norm_pre.weight" in message and "stages_2/blocks/gamma[block=1]" in message


def test_not_a_convnext_checkpoint(tmp_path):
  save({"stem.0.weight": torch.zeros(8, 3, 4, 4)}, tmp_path / "model.safetensors")
  with pytest.raises(ValueError, match="not a timm ConvNeXt checkpoint"):
    convnext_port.load_convnext(tmp_path)


def test_public_loader(tmp_path):
  porting = pytest.importorskip("leo_mini_jax.porting")
  if not hasattr(porting, "load_vision_expert"):
    pytest.skip("porting.load_vision_expert not assembled yet")
  model = tiny_timm(seed=6, norm_eps=1e-5)
  save(model.state_dict(), tmp_path / "model.safetensors")
  module, params = porting.load_vision_expert("convnext", tmp_path, image_size=64)
  x = pixels(64, seed=7)
  np.testing.assert_allclose(np.asarray(module.apply({"params": params}, jnp.asarray(x))),
                             timm_tokens(model, x), atol=1e-4, rtol=1e-4)


class ShapeOnlyReader:
  """Names and shapes of a state dict, no data: enough for config inference and `plan`."""

  def __init__(self, state):
    self._shapes = {k: tuple(v.shape) for k, v in state.items()}

  def keys(self):
    return list(self._shapes)

  def shape(self, key):
    return self._shapes[key]

  def __repr__(self):
    return "ShapeOnlyReader"


def test_full_size_convnext_xxlarge_plan():
  """The real convnext_xxlarge key set and shapes (meta tensors) fit the default config."""
  from leo_mini_jax.models.vision.convnext import ConvNextConfig, ConvNextTower
  from leo_mini_jax.porting import mapping
  with torch.device("meta"):
    model = timm.create_model("convnext_xxlarge", pretrained=False)
  state = {f"visual.trunk.{k}": v for k, v in model.state_dict().items()}
  reader = ShapeOnlyReader(state)
  config = convnext_port.config_from_checkpoint(reader, image_size=1024)
  assert config == ConvNextConfig()
  expected = mapping.abstract_params(ConvNextTower(config), jnp.zeros((1, 128, 128, 3)))
  assignments, allowed = mapping.plan(reader, convnext_port.convnext_rules(open_clip=True),
                                      expected)
  assert not allowed and {a.target for a in assignments} == set(mapping.flatten_tree(expected))
  assert len(assignments) == len([k for k in state if ".head." not in k])  # all but the head
