"""SAM port: parity with HF transformers' SamVisionEncoder and with EAGLE's SAM expert.

Tiny random SamModel folders are built with transformers, every parameter set to noise
(HF initialises the position tables to zero and the linears to ~1e-10, which would hide
a skipped or transposed tensor), saved with `save_pretrained` and loaded through
`porting.load_vision_expert("sam", folder)`.
"""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.porting.conftest import reference_libraries

torch, transformers, safetensors_torch = reference_libraries(
    "torch", "transformers", "safetensors.torch")

from leo_mini_jax import porting  # noqa: E402
from leo_mini_jax.models.vision import sam as sam_lib  # noqa: E402
from leo_mini_jax.porting import mapping  # noqa: E402
from leo_mini_jax.porting import readers  # noqa: E402
from leo_mini_jax.porting import sam as sam_port  # noqa: E402


# Grid 10 with window 3: windowed blocks pad the grid to 12. Blocks 1 and 3 are global
# (a repeating pair), or only block 2 of 3 (no repeat: one group of all blocks).
VISION = dict(hidden_size=32, output_channels=8, num_hidden_layers=4, num_attention_heads=4,
              image_size=80, patch_size=8, window_size=3, global_attn_indexes=[1, 3],
              mlp_dim=48)
IRREGULAR = dict(VISION, num_hidden_layers=3, global_attn_indexes=[2], window_size=4)

# facebook/sam-vit-large's vision_config.
SAM_VIT_LARGE = dict(hidden_size=1024, output_channels=256, num_hidden_layers=24,
                     num_attention_heads=16, image_size=1024, patch_size=16, window_size=14,
                     global_attn_indexes=[5, 11, 17, 23], mlp_dim=4096, qkv_bias=True,
                     use_abs_pos=True, use_rel_pos=True, layer_norm_eps=1e-6)


def randomize_(module, seed=0):
  """Every parameter to noise: LayerNorm weights near 1, matrices ~ fan_in^-½, rest 0.3·N."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if "norm" in name and name.endswith("weight"):
        p.copy_(1 + 0.2 * noise)
      elif p.ndim >= 2 and not name.endswith(("pos_embed", "rel_pos_h", "rel_pos_w")):
        p.copy_(noise * (p[0].numel() ** -0.5))
      else:
        p.copy_(0.3 * noise)
  return module


def tiny_sam_model(vision=VISION, seed=0, attn="sdpa"):
  t = transformers
  config = t.SamConfig(
      vision_config=t.SamVisionConfig(**vision).to_dict(),
      prompt_encoder_config=t.SamPromptEncoderConfig(
          hidden_size=8, image_size=vision["image_size"], patch_size=vision["patch_size"]
      ).to_dict(),
      mask_decoder_config=t.SamMaskDecoderConfig(
          hidden_size=8, mlp_dim=16, num_hidden_layers=1, num_attention_heads=2,
          iou_head_hidden_dim=8).to_dict(),
      attn_implementation=attn)
  return randomize_(t.SamModel(config).eval(), seed)


def pixels(size, batch=2, seed=1):
  return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


def to_torch(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def pre_neck(encoder, x):
  """HF SamVisionEncoder's hidden states before its neck: [B, g, g, D]."""
  h = encoder.patch_embed(x) + encoder.pos_embed
  for layer in encoder.layers:
    h = layer(h)
  return h


class ShortNeck(torch.nn.Module):
  """EAGLE's ShortSamVisionNeck: 1×1 conv (no bias) → LayerNorm2d (in float32) → NHWC."""

  def __init__(self, hidden, channels, eps=1e-6):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(hidden, channels, kernel_size=1, bias=False)
    self.layer_norm1 = torch.nn.Module()
    self.layer_norm1.weight = torch.nn.Parameter(torch.ones(channels))
    self.layer_norm1.bias = torch.nn.Parameter(torch.zeros(channels))
    self.eps = eps

  def forward(self, x):                      # x: [B, g, g, D]
    x = self.conv1(x.permute(0, 3, 1, 2))
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    x = (x - u) / torch.sqrt(s + self.eps)
    x = self.layer_norm1.weight[:, None, None] * x + self.layer_norm1.bias[:, None, None]
    return x.permute(0, 2, 3, 1)


class EagleSamTower(torch.nn.Module):
  """EAGLE's SAMVisionTower with add_pixel_shuffle=True, and the fusion's 4-D flatten."""

  def __init__(self, sam_model, seed=5):
    super().__init__()
    encoder = sam_model.vision_encoder
    config = encoder.config
    encoder.neck = randomize_(ShortNeck(config.hidden_size, config.output_channels), seed)
    self.vision_tower = encoder

  def forward(self, images):
    h = pre_neck(self.vision_tower, images)           # the encoder's forward, neck replaced
    features = self.vision_tower.neck(h).flatten(start_dim=1, end_dim=2)
    b, n, c = features.shape
    side = int(n ** 0.5)
    features = features.transpose(1, 2).reshape(b, c, side, side)
    features = torch.nn.functional.pixel_unshuffle(features, 2)
    return features.flatten(2, 3).transpose(1, 2)    # [B, (g/2)², 4C]


# ---------------------------------------------------------------- HF neck parity

@pytest.mark.parametrize("vision,attn", [(VISION, "sdpa"), (VISION, "eager"),
                                         (IRREGULAR, "sdpa")])
def test_hf_neck_matches_transformers(tmp_path, vision, attn):
  model = tiny_sam_model(vision, attn=attn)
  model.save_pretrained(tmp_path)
  module, params = porting.load_vision_expert("sam", tmp_path, neck="hf")
  cfg = module.config
  assert cfg.block_period == (2 if vision is VISION else 3)
  x = pixels(vision["image_size"])
  out = np.asarray(module.apply({"params": params}, jnp.asarray(x)))
  with torch.no_grad():
    ref = model.vision_encoder(to_torch(x)).last_hidden_state       # [B, C, g, g]
  ref = ref.flatten(2).transpose(1, 2).numpy()
  assert out.shape == ref.shape == (2, 100, 8)
  assert cfg.output_grid == (10, 10) and cfg.feature_dim == 8
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_sam_vision_model_folder(tmp_path):
  """A SamVisionModel folder (top-level vision config) ports the same way."""
  model = randomize_(transformers.SamVisionModel(transformers.SamVisionConfig(**VISION)).eval())
  model.save_pretrained(tmp_path)
  module, params = porting.load_vision_expert("sam", tmp_path, neck="hf")
  x = pixels(80, batch=1, seed=3)
  with torch.no_grad():
    ref = model(to_torch(x)).last_hidden_state.flatten(2).transpose(1, 2).numpy()
  np.testing.assert_allclose(np.asarray(module.apply({"params": params}, jnp.asarray(x))), ref,
                             atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- EAGLE's arrangement

def test_eagle_release_layout_matches_eagle_tower(tmp_path):
  """EAGLE's tower state dict (keys `vision_tower.…`, short neck under `neck.`) → same output."""
  tower = EagleSamTower(tiny_sam_model(seed=2)).eval()
  file = tmp_path / "eagle_sam.safetensors"
  safetensors_torch.save_file({k: v.contiguous() for k, v in tower.state_dict().items()}, file)
  with readers.open_checkpoint(file) as reader:
    shapes = {k[len("vision_tower."):]: reader.shape(k) for k in reader.keys()}
    cfg = sam_port.config_from_shapes(shapes)
    assert (cfg.num_heads, cfg.window_size, cfg.global_attn_indexes) == (4, 3, (1, 3))
    module = sam_lib.SamVisionTower(cfg)
    rules = mapping.prefixed(sam_port.sam_rules(config=cfg), "vision_tower.", "")
    params = mapping.convert(reader, rules,
                             mapping.abstract_params(module, jnp.zeros((1, 80, 80, 3))))
  assert set(params["eagle_neck"]) == {"conv1", "layer_norm1"} and "neck" not in params
  x = pixels(80, seed=4)
  out = np.asarray(module.apply({"params": params}, jnp.asarray(x)))
  with torch.no_grad():
    ref = tower(to_torch(x)).numpy()
  assert out.shape == ref.shape == (2, 25, 32)
  assert cfg.output_grid == (5, 5) and cfg.feature_dim == 32
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_sam_checkpoint_into_eagle_tower_has_fresh_neck(tmp_path):
  """load_vision_expert('sam', SamModel folder): HF's neck skipped, eagle_neck fresh."""
  model = tiny_sam_model(seed=6)
  model.save_pretrained(tmp_path)
  module, params = porting.load_vision_expert("sam", tmp_path)   # neck='eagle' (default)
  assert module.config.neck == "eagle" and "neck" not in params
  fresh = jax.tree.map(np.asarray, params["eagle_neck"])
  np.testing.assert_array_equal(fresh["layer_norm1"]["scale"], np.ones(8))
  np.testing.assert_array_equal(fresh["layer_norm1"]["bias"], np.zeros(8))
  assert np.abs(fresh["conv1"]["kernel"]).max() > 0
  # With EAGLE's neck weights put in, the output is EAGLE's tower on the same encoder.
  tower = EagleSamTower(model, seed=7).eval()
  neck = tower.vision_tower.neck
  params = dict(params, eagle_neck={
      "conv1": {"kernel": jnp.asarray(neck.conv1.weight.detach().numpy().transpose(2, 3, 1, 0))},
      "layer_norm1": {"scale": jnp.asarray(neck.layer_norm1.weight.detach().numpy()),
                      "bias": jnp.asarray(neck.layer_norm1.bias.detach().numpy())}})
  x = pixels(80, batch=1, seed=8)
  with torch.no_grad():
    ref = tower(to_torch(x)).numpy()
  np.testing.assert_allclose(np.asarray(module.apply({"params": params}, jnp.asarray(x))), ref,
                             atol=1e-4, rtol=1e-4)


def test_pixel_unshuffle_channel_order_matches_torch():
  x = np.random.default_rng(9).standard_normal((2, 6, 4, 5)).astype(np.float32)   # NHWC
  ref = torch.nn.functional.pixel_unshuffle(to_torch(x), 2).permute(0, 2, 3, 1).numpy()
  np.testing.assert_array_equal(np.asarray(sam_lib.pixel_unshuffle(jnp.asarray(x), 2)), ref)


# ---------------------------------------------------------------- errors

def test_missing_unexpected_and_mismatched_keys_are_named(tmp_path):
  tiny_sam_model().save_pretrained(tmp_path)
  file = tmp_path / "model.safetensors"
  tensors = safetensors_torch.load_file(file)
  del tensors["vision_encoder.layers.3.attn.rel_pos_w"]
  tensors["vision_encoder.layers.0.attn.extra"] = torch.zeros(3)
  tensors["vision_encoder.layers.2.mlp.lin1.bias"] = torch.zeros(47)
  safetensors_torch.save_file(tensors, file)
  with pytest.raises(mapping.PortError) as info:
    porting.load_vision_expert("sam", tmp_path, neck="hf")
  error = info.value
  assert any("layers/blocks_1/attn/rel_pos_w[group=1]" in m for m in error.missing)
  assert any("vision_encoder.layers.0.attn.extra" in u for u in error.unexpected)
  assert any("vision_encoder.layers.2.mlp.lin1.bias" in m and "(47,)" in m
             for m in error.mismatched)


def test_config_json_disagreeing_with_weights_is_named(tmp_path):
  tiny_sam_model().save_pretrained(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  config["vision_config"]["global_attn_indexes"] = [3]
  config["vision_config"]["num_attention_heads"] = 2
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"num_heads: config.json 2, weights 4.*"
                                       r"global_attn_indexes: config.json \(3,\)"):
    porting.load_vision_expert("sam", tmp_path)


def test_open_source_and_run_fields(tmp_path):
  tiny_sam_model().save_pretrained(tmp_path)
  run = sam_port.config_from_hf(tmp_path, remat=True)
  overrides = {f: getattr(run, f) for f in sam_port.RUN_FIELDS}
  reader, rules, derived = sam_port.open_source(str(tmp_path), run, overrides)
  with reader:
    assert derived == run
    module = sam_lib.SamVisionTower(derived)
    expected = mapping.abstract_params(module, jnp.zeros((1, 80, 80, 3)))
    with pytest.raises(mapping.PortError, match="eagle_neck/conv1/kernel"):
      mapping.convert(reader, rules, expected)
    params = mapping.convert(reader, rules, expected, allow_missing=sam_port.EAGLE_NECK,
                             fill=mapping.OMIT, to_device=False)
  assert "eagle_neck" not in params and params["layers"]["blocks_0"]["attn"]["q_proj"]
  # The converter leaves the fresh neck to train.py, which initialises it in stage 1.
  from leo_mini_jax.porting import convert  # pylint: disable=import-outside-toplevel
  from leo_mini_jax import stages  # pylint: disable=import-outside-toplevel
  for regex in (convert.NEW_MODULES, stages.STAGE_NEW_PARAMS[1]):
    assert re.fullmatch(regex, "vision/sam/eagle_neck/conv1/kernel")
    assert not re.fullmatch(regex, "vision/sam/layers/blocks_0/attn/proj/kernel")


# ---------------------------------------------------------------- full size

def test_full_size_config_and_parameter_count():
  """SAM ViT-L: shapes of the meta-device HF model give SamConfig()'s architecture, and
  the tower has HF's parameter count (EAGLE's: HF's minus its neck plus the new neck)."""
  with torch.device("meta"):
    hf = transformers.SamVisionModel(transformers.SamVisionConfig(**SAM_VIT_LARGE))
  state = hf.state_dict()
  shapes = {k: tuple(v.shape) for k, v in state.items()}
  derived = sam_port.config_from_shapes(shapes)
  assert derived == sam_lib.SamConfig()
  reference = sum(p.numel() for p in hf.parameters())
  hf_neck = sum(p.numel() for n, p in hf.named_parameters() if ".neck." in n)
  eagle_neck = 256 * 1024 + 2 * 256

  def count(cfg):
    params = mapping.abstract_params(sam_lib.SamVisionTower(cfg), jnp.zeros((1, 1024, 1024, 3)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))

  assert count(dataclasses.replace(derived, neck="hf")) == reference
  assert count(sam_lib.SamConfig()) == reference - hf_neck + eagle_neck
  # And the HF keys plan onto the tower with nothing missing or left over.
  reader = _ShapeReader(shapes)
  cfg = dataclasses.replace(derived, neck="hf")
  expected = mapping.abstract_params(sam_lib.SamVisionTower(cfg), jnp.zeros((1, 1024, 1024, 3)))
  assignments, allowed = mapping.plan(reader, sam_port.sam_rules(neck="hf", config=cfg), expected)
  assert not allowed and len({a.key for a in assignments}) == len(shapes)


class _ShapeReader(readers.CheckpointReader):
  """Names and shapes only (planning reads no data)."""

  def __init__(self, shapes):
    self._shapes = dict(shapes)
    self.files = ("<meta SamVisionModel>",)

  def keys(self):
    return list(self._shapes)

  def shape(self, key):
    return self._shapes[key]
