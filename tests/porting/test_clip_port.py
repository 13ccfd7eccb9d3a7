"""HF CLIP vision tower → ClipVisionTower: parity with transformers on tiny random models."""

import inspect
import json

import jax.numpy as jnp
import numpy as np
import pytest

from tests.porting.conftest import randomize_, reference_libraries

torch, transformers, safetensors_torch = reference_libraries(
    "torch", "transformers", "safetensors.torch")

from leo_mini_jax.porting import clip as clip_port  # noqa: E402
from leo_mini_jax.porting.mapping import PortError  # noqa: E402


TINY = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4)


def tiny_vision_model(hidden_act="quick_gelu", seed=0):
  config = transformers.CLIPVisionConfig(hidden_act=hidden_act, **TINY)
  return randomize_(transformers.CLIPVisionModel(config), seed)


def pixels(size, seed=1):
  return np.random.default_rng(seed).standard_normal((2, size, size, 3)).astype(np.float32)


def torch_pixels(x):
  return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def vision_part(model):
  """The CLIPVisionTransformer of a CLIPVisionModel/CLIPModel (4.x nests it, 5.x does not)."""
  return getattr(model, "vision_model", model)


def hf_drop_reference(model, x, interpolate):
  """EAGLE's HR-CLIP with HF's modules: embeddings → drop class token → pre-LN → layers."""
  vm = vision_part(model)
  with torch.no_grad():
    h = vm.embeddings(torch_pixels(x), interpolate_pos_encoding=interpolate)[:, 1:]
    h = vm.pre_layrnorm(h)
    for layer in vm.encoder.layers:
      args = (h, None, None) if "causal_attention_mask" in inspect.signature(
          layer.forward).parameters else (h, None)
      out = layer(*args)
      h = out[0] if isinstance(out, tuple) else out
  return h.numpy()


def hf_keep_reference(model, x, interpolate):
  with torch.no_grad():
    out = vision_part(model)(torch_pixels(x), interpolate_pos_encoding=interpolate)
  return out.last_hidden_state[:, 1:].numpy()


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("size", [32, 48])
@pytest.mark.parametrize("cls_token", ["keep", "drop"])
def test_parity_with_transformers(tmp_path, hidden_act, size, cls_token):
  model = tiny_vision_model(hidden_act)
  model.save_pretrained(tmp_path)
  module, params = clip_port.load_clip(tmp_path, cls_token=cls_token,
                                       image_size=None if size == 32 else size)
  assert module.config.hidden_act == hidden_act
  assert module.config.pretrained_image_size == 32 and module.config.image_size == size
  x = pixels(size)
  out = np.asarray(module.apply({"params": params}, jnp.asarray(x)))
  reference = hf_keep_reference if cls_token == "keep" else hf_drop_reference
  expected = reference(model, x, interpolate=size != 32)
  assert out.shape == expected.shape == (2, (size // 8) ** 2, 32)
  np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4)


def test_drop_differs_from_keep_on_the_same_checkpoint():
  model = tiny_vision_model()
  x = pixels(32)
  drop, keep = hf_drop_reference(model, x, False), hf_keep_reference(model, x, False)
  assert np.abs(drop - keep).max() > 1e-2


def test_full_clip_model_and_prefixed_keys(tmp_path):
  config = transformers.CLIPConfig(
      vision_config=dict(TINY, hidden_act="gelu"),
      text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, vocab_size=64, bos_token_id=0, eos_token_id=1,
                       pad_token_id=1),
      projection_dim=8)
  model = randomize_(transformers.CLIPModel(config), seed=3)
  model.save_pretrained(tmp_path / "full")
  with open(tmp_path / "full" / "preprocessor_config.json", "w") as f:
    json.dump({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}, f)
  module, params = clip_port.load_clip(tmp_path / "full", cls_token="keep")
  assert module.config.hidden_act == "gelu" and module.config.mean == (0.5, 0.5, 0.5)
  x = pixels(32, seed=4)
  expected = hf_keep_reference(model, x, interpolate=False)
  np.testing.assert_allclose(np.asarray(module.apply({"params": params}, jnp.asarray(x))),
                             expected, atol=1e-4, rtol=1e-4)

  # A CLIPVisionModel as transformers 4.x saved it: every key under `vision_model.`.
  vision_state = {k: v for k, v in model.state_dict().items() if k.startswith("vision_model.")}
  (tmp_path / "prefixed").mkdir()
  safetensors_torch.save_file({k: v.contiguous() for k, v in vision_state.items()},
                              str(tmp_path / "prefixed" / "model.safetensors"))
  with open(tmp_path / "prefixed" / "config.json", "w") as f:
    json.dump(dict(model_type="clip_vision_model", hidden_act="gelu", **TINY), f)
  module2, params2 = clip_port.load_clip(tmp_path / "prefixed")
  np.testing.assert_allclose(np.asarray(module2.apply({"params": params2}, jnp.asarray(x))),
                             expected, atol=1e-4, rtol=1e-4)


def test_config_defaults_for_omitted_fields():
  # transformers 4.x wrote only non-default fields (openai/clip-vit-large-patch14-336).
  cfg = clip_port.config_from_hf(
      {"model_type": "clip", "vision_config": {
          "hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
          "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14}},
      cls_token="drop", image_size=448)
  assert (cfg.hidden_act, cfg.layer_norm_eps, cfg.num_layers) == ("quick_gelu", 1e-5, 24)
  assert (cfg.image_size, cfg.pretrained_image_size, cfg.output_grid) == (448, 336, (32, 32))
  with pytest.raises(ValueError, match="hidden_act='gelu_new' is not supported"):
    clip_port.config_from_hf({"hidden_act": "gelu_new"})
  with pytest.raises(ValueError, match="not a CLIP vision model"):
    clip_port.config_from_hf({"model_type": "siglip_vision_model"})


def test_mismatched_checkpoint_is_reported_by_name(tmp_path):
  model = tiny_vision_model()
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  del state["encoder.layers.1.mlp.fc2.bias"]
  state["encoder.layers.0.self_attn.qkv.weight"] = torch.zeros(96, 32)
  state["embeddings.position_embedding.weight"] = torch.zeros(10, 32)
  safetensors_torch.save_file(state, str(tmp_path / "model.safetensors"))
  with open(tmp_path / "config.json", "w") as f:
    json.dump(dict(model_type="clip_vision_model", **TINY), f)
  with pytest.raises(PortError) as info:
    clip_port.load_clip(tmp_path)
  message = str(info.value)
  assert "layers/mlp/fc2/bias[layer=1]" in message
  assert "encoder.layers.0.self_attn.qkv.weight" in message
  assert "position_embedding" in message and "(17, 32)" in message


def test_public_loader(tmp_path):
  porting = pytest.importorskip("leo_mini_jax.porting")
  if not hasattr(porting, "load_vision_expert"):
    pytest.skip("porting.load_vision_expert not assembled yet")
  model = tiny_vision_model()
  model.save_pretrained(tmp_path)
  module, params = porting.load_vision_expert("clip", tmp_path, cls_token="drop")
  x = pixels(32, seed=5)
  np.testing.assert_allclose(np.asarray(module.apply({"params": params}, jnp.asarray(x))),
                             hf_drop_reference(model, x, False), atol=1e-4, rtol=1e-4)


def test_full_size_vit_large_336_plan():
  """openai/clip-vit-large-patch14-336's vision keys and shapes (meta tensors) fit."""
  from leo_mini_jax.models.vision.clip import ClipVisionTower
  from leo_mini_jax.porting import mapping
  hf = dict(hidden_size=1024, image_size=336, intermediate_size=4096, num_attention_heads=16,
            num_hidden_layers=24, patch_size=14)
  with torch.device("meta"):
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**hf))
  shapes = {f"vision_model.{k.removeprefix('vision_model.')}": tuple(v.shape)
            for k, v in model.state_dict().items()}

  class ShapeOnlyReader:
    keys = lambda self: list(shapes)
    shape = lambda self, key: shapes[key]

  config = clip_port.config_from_hf({"model_type": "clip", "vision_config": hf},
                                    cls_token="drop", image_size=448)
  expected = mapping.abstract_params(ClipVisionTower(config), jnp.zeros((1, 448, 448, 3)))
  assignments, allowed = mapping.plan(ShapeOnlyReader(), clip_port.clip_rules(), expected)
  assert not allowed and {a.target for a in assignments} == set(mapping.flatten_tree(expected))
  assert len(assignments) == 5 + 24 * 16  # embeddings + pre-LN, then 16 tensors per layer
  assert config.output_grid == (32, 32) and config.pretrained_grid == 24
