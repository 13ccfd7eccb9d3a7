"""HF Pix2Struct vision encoder → Pix2StructEncoder / Pix2StructTower: parity with HF."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.porting.conftest import randomize_ as _randomize_all, reference_libraries

torch, transformers, safetensors_torch = reference_libraries(
    "torch", "transformers", "safetensors.torch")

from leo_mini_jax import porting  # noqa: E402
from leo_mini_jax.models.vision import pix2struct as p2s  # noqa: E402
from leo_mini_jax.porting import mapping  # noqa: E402
from leo_mini_jax.porting import pix2struct as p2s_port  # noqa: E402
from leo_mini_jax.porting.mapping import PortError  # noqa: E402


# 4-px patches (48 values), heads·d_kv = 24 ≠ hidden 32; max_patches 27 → a 5×5 grid + 2 pads.
TINY_VISION = dict(hidden_size=32, patch_embed_hidden_size=48, d_ff=40, d_kv=6,
                   num_hidden_layers=2, num_attention_heads=4, seq_len=12,
                   dense_act_fn="gelu_new", layer_norm_eps=1e-6)
TINY_TEXT = dict(vocab_size=40, hidden_size=16, d_kv=4, d_ff=24, num_layers=1, num_heads=2)
MAX_PATCHES = 27
# google/pix2struct-large's encoder (transformers' conversion script, --use_large):
LARGE_VISION = dict(hidden_size=1536, d_ff=3968, num_attention_heads=24, num_hidden_layers=18,
                    d_kv=64, patch_embed_hidden_size=768, seq_len=4096, dense_act_fn="gelu_new",
                    layer_norm_eps=1e-6)


def randomize_(model, seed=0):
  """Every parameter to noise (HF inits norms to 1, biases to 0, linears near 0); every
  norm parameter (T5-style norms have a weight only) around 1."""
  return _randomize_all(model, seed, norm_suffix="")


def vision_model(seed=0):
  config = transformers.Pix2StructVisionConfig(**TINY_VISION)
  return randomize_(transformers.Pix2StructVisionModel(config), seed)


def full_model(seed=0):
  config = transformers.Pix2StructConfig(
      vision_config=TINY_VISION, text_config=TINY_TEXT)
  return randomize_(transformers.Pix2StructForConditionalGeneration(config), seed)


def save(model, folder):
  model.save_pretrained(folder, safe_serialization=True)
  return folder


def uint8_images(size, batch=2, seed=1):
  return np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)


def padded_patches(seed=2):
  """Processor-style rows for two images: 25 real + 2 zero rows, and 10 more zeroed in image 1."""
  pixels = jnp.asarray(uint8_images(20, seed=seed), jnp.float32) / 255.0
  fp = np.asarray(p2s.flattened_patches(pixels, 4))
  fp = np.concatenate([fp, np.zeros((2, MAX_PATCHES - 25, fp.shape[-1]), np.float32)], axis=1)
  fp[1, -12:] = 0.0
  return fp, (fp.sum(-1) != 0).astype(np.float32)


def hf_last_hidden(model, fp, mask):
  vision = getattr(model, "encoder", model) if isinstance(
      model, transformers.Pix2StructForConditionalGeneration) else model
  with torch.no_grad():
    out = vision(flattened_patches=torch.from_numpy(fp), attention_mask=torch.from_numpy(mask))
  return out.last_hidden_state.numpy()


# ---------------------------------------------------------------- parity

@pytest.mark.parametrize("kind", ["vision", "full"])
def test_encoder_matches_hf_with_padding_rows(tmp_path, kind):
  model = vision_model() if kind == "vision" else full_model()
  folder = save(model, tmp_path / kind)
  encoder, params = p2s_port.load_encoder(folder, max_patches=MAX_PATCHES, image_size=20)
  assert encoder.config.num_heads == 4 and encoder.config.head_dim == 6
  assert encoder.config.patch_size == 4 and encoder.config.seq_len == 12
  fp, mask = padded_patches()
  assert mask.sum(-1).tolist() == [25.0, 15.0]
  out = encoder.apply({"params": params}, jnp.asarray(fp), jnp.asarray(mask))
  expected = hf_last_hidden(model, fp, mask)
  # Every row, padding rows included (they attend to the real ones, as in HF).
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-4, rtol=1e-4)


def test_tower_through_load_vision_expert_matches_processor_then_hf(tmp_path):
  """EAGLE's pipeline at toy size: processor(image) → HF encoder → first grid² rows."""
  model = full_model(seed=3)
  folder = save(model, tmp_path / "full")
  tower, params = porting.load_vision_expert("pix2struct", folder, max_patches=MAX_PATCHES,
                                             image_size=32)
  assert isinstance(tower, p2s.Pix2StructTower) and tower.config.output_grid == (5, 5)
  images = uint8_images(32, seed=4)  # the processor resizes to 20 px, and so does the tower
  processor = NUMPY_PROCESSOR(max_patches=MAX_PATCHES, patch_size={"height": 4, "width": 4})
  inputs = processor(images=list(images), return_tensors="pt")
  assert inputs["attention_mask"].sum(-1).tolist() == [25.0, 25.0]
  expected = hf_last_hidden(model, inputs["flattened_patches"].numpy(),
                            inputs["attention_mask"].numpy())[:, :25]
  out = tower.apply({"params": params}, jnp.asarray(images, jnp.float32) / 255.0)
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-4, rtol=1e-4)


def test_tower_matches_eagle_pipeline_at_full_patch_geometry(tmp_path):
  """EAGLE's Pix2Struct path on a 1024² image: 16-px patches, max_patches 2048, a narrow model."""
  vision = dict(TINY_VISION, patch_embed_hidden_size=768, seq_len=64)
  model = randomize_(transformers.Pix2StructVisionModel(
      transformers.Pix2StructVisionConfig(**vision)), seed=7)
  folder = save(model, tmp_path / "vision")
  tower, params = porting.load_vision_expert("pix2struct", folder)  # image_size 1024, 2048
  assert tower.config.output_grid == (45, 45) and tower.config.resized_size == 720
  image = uint8_images(1024, batch=1, seed=8)
  inputs = NUMPY_PROCESSOR()(images=list(image), return_tensors="pt")  # max_patches=2048
  expected = hf_last_hidden(model, inputs["flattened_patches"].numpy(),
                            inputs["attention_mask"].numpy())[:, :2025]  # EAGLE's slice
  out = jax.jit(tower.apply)({"params": params}, jnp.asarray(image, jnp.float32) / 255.0)
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-4, rtol=1e-4)


def _processors():
  found = [transformers.Pix2StructImageProcessor]
  if hasattr(transformers, "Pix2StructImageProcessorPil"):
    found.append(transformers.Pix2StructImageProcessorPil)
  return found


def _std_ddof(processor_cls):
  """transformers 5's torchvision processor takes torch.std (N−1); the numpy ones np.std (N)."""
  return int(any(base.__name__ == "TorchvisionBackend" for base in processor_cls.__mro__))


# The processor EAGLE ran (transformers 4.x's numpy one; 5.x keeps it as the PIL backend).
NUMPY_PROCESSOR = next(c for c in reversed(_processors()) if _std_ddof(c) == 0)


@pytest.mark.parametrize("processor_cls", _processors(), ids=lambda c: c.__name__)
@pytest.mark.parametrize("size,patch,max_patches,side", [
    (20, 4, MAX_PATCHES, 5), (32, 4, MAX_PATCHES, 5),  # at the grid's size; resized 32 → 20
    (720, 16, 2048, 45), (1024, 16, 2048, 45)])        # EAGLE's: 1024 master → 720
def test_on_device_patches_match_processor(processor_cls, size, patch, max_patches, side):
  """Standardise, resize to the processor's grid, extract: the processor's rows to ~1e-5."""
  images = uint8_images(size, seed=5)
  processor = processor_cls(max_patches=max_patches, patch_size={"height": patch, "width": patch})
  inputs = processor(images=list(images), return_tensors="np")
  expected, mask = np.asarray(inputs["flattened_patches"]), np.asarray(inputs["attention_mask"])
  assert p2s.processor_grid(size, size, max_patches, patch) == (side, side)
  assert expected.shape == (2, max_patches, 2 + 3 * patch * patch)
  assert mask.sum(-1).tolist() == [side * side] * 2
  np.testing.assert_array_equal(expected[:, side * side:], 0.0)
  ours = np.array(p2s.flattened_patches(jnp.asarray(images, jnp.float32) / 255.0, patch,
                                        (side, side)))
  # An N−1 std scales every standardised value by √((N−1)/N): 4e-4 relative at 20 px,
  # 3e-7 at 720 px (EAGLE's size).
  n = size * size * 3
  ours[..., 2:] *= np.sqrt((n - _std_ddof(processor_cls)) / n)
  np.testing.assert_allclose(ours, expected[:, :side * side], atol=1e-5, rtol=1e-5)


def test_processor_grid_for_eagle_master_image():
  """max_patches=2048 on EAGLE's 1024² master image: a 45×45 grid (720 px), 23 pad rows."""
  assert p2s.processor_grid(1024, 1024, 2048, 16) == (45, 45)
  image = np.random.default_rng(6).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
  inputs = transformers.Pix2StructImageProcessor()(images=[image], return_tensors="np")
  fp = np.asarray(inputs["flattened_patches"])[0]
  assert fp.shape == (2048, 770) and int(np.asarray(inputs["attention_mask"]).sum()) == 2025
  np.testing.assert_array_equal(fp[:2025, 0], np.repeat(np.arange(1, 46), 45))
  np.testing.assert_array_equal(fp[:2025, 1], np.tile(np.arange(1, 46), 45))
  assert (p2s.Pix2StructConfig().input_size, p2s.Pix2StructConfig().resized_size) == (1024, 720)


# ---------------------------------------------------------------- configs

def test_config_json_forms(tmp_path):
  folder = save(full_model(), tmp_path / "full")
  with open(folder / "config.json") as f:
    full = json.load(f)
  vision = dict(full["vision_config"])
  # transformers 4.x diff-dicts leave out fields equal to the defaults (d_kv 64 here).
  minimal = {k: v for k, v in vision.items() if k not in ("layer_norm_eps", "dense_act_fn")}
  fields, _ = p2s_port.hf_vision_config({"model_type": "pix2struct", "vision_config": minimal})
  assert fields["dense_act_fn"] == "gelu_new" and fields["layer_norm_eps"] == 1e-6
  fields, _ = p2s_port.hf_vision_config(dict(vision, model_type="pix2struct_vision_model"))
  assert fields["num_attention_heads"] == 4 and fields["d_kv"] == 6
  with pytest.raises(ValueError, match="model_type 'clip' is not a Pix2Struct"):
    p2s_port.hf_vision_config({"model_type": "clip"})


def test_config_json_disagreeing_with_weights_is_named(tmp_path):
  folder = save(vision_model(), tmp_path / "vision")
  with open(folder / "config.json") as f:
    cfg = json.load(f)
  cfg["d_ff"] = 64
  with open(folder / "config.json", "w") as f:
    json.dump(cfg, f)
  with pytest.raises(ValueError, match=r"config.json disagrees with the weights.*d_ff=64 "
                                       r"\(weights: 40\)"):
    p2s_port.load_pix2struct(folder, max_patches=MAX_PATCHES, image_size=20)


def test_bad_keys_are_reported_by_name(tmp_path):
  model = vision_model()
  folder = save(model, tmp_path / "vision")
  state = {k: v.clone() for k, v in model.state_dict().items()}
  del state["encoder.layer.1.mlp.wo.weight"]
  state["embeddings.extra.weight"] = torch.zeros(3)
  state["layernorm.weight"] = torch.ones(31)
  safetensors_torch.save_file(state, str(folder / "model.safetensors"))
  with pytest.raises(PortError) as err:
    porting.load_vision_expert("pix2struct", folder, max_patches=MAX_PATCHES, image_size=20)
  message = str(err.value)
  # (the expected key is shown in the full model's form, `encoder.` prefix present)
  assert "layers/mlp/wo/kernel[layer=1] (expected from encoder.encoder.layer.1.mlp.wo.weight)" \
      in message
  assert "embeddings.extra.weight: no mapping rule matches it" in message
  assert "layernorm/scale: checkpoint layernorm.weight has shape (31,)" in message


def test_not_a_pix2struct_checkpoint_is_named():
  with pytest.raises(ValueError, match="not a Pix2Struct vision encoder"):
    p2s_port.config_from_shapes({"vision_model.embeddings.patch_embedding.weight": (8, 3, 4, 4)})


# ---------------------------------------------------------------- full size

def _meta_state_shapes(model):
  return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_full_size_parameter_count_and_plan_match_hf():
  with torch.device("meta"):
    hf = transformers.Pix2StructVisionModel(transformers.Pix2StructVisionConfig(**LARGE_VISION))
  hf_count = sum(p.numel() for p in hf.parameters())
  shapes = _meta_state_shapes(hf)
  config = p2s_port.config_from_shapes(shapes)
  assert config == p2s.Pix2StructConfig()  # the defaults are pix2struct-large's
  abstract = mapping.abstract_params(p2s.Pix2StructTower(config), jnp.zeros((1, 1024, 1024, 3)))
  ours = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract))
  assert ours == hf_count == 512_812_032

  class ShapeOnlyReader:
    def __init__(self, shapes):
      self.shapes = shapes
    keys = lambda self: list(self.shapes)
    shape = lambda self, key: self.shapes[key]

  # As a full model (`encoder.` prefix) and inside an EAGLE release.
  for prefix, source_prefix in (("encoder.", ""),
                                ("", "model.vision_tower.vision_tower.vision_towers.2."
                                     "vision_tower.")):
    keyed = {f"{source_prefix}{prefix}{k}": s for k, s in shapes.items()}
    if source_prefix:
      relative = {k[len(source_prefix):]: s for k, s in keyed.items()}
      assert p2s_port.config_from_shapes(relative) == config
      rules = mapping.prefixed(p2s_port.pix2struct_rules(), source_prefix, "vision/pix2struct/")
      expected = {"vision": {"pix2struct": abstract}}
    else:
      rules, expected = p2s_port.pix2struct_rules(), abstract
    assignments, allowed = mapping.plan(ShapeOnlyReader(keyed), rules, expected)
    assert not allowed
    assert {a.target for a in assignments} == set(mapping.flatten_tree(expected))
    assert len(assignments) == 5 + 18 * 9  # 4 embedding tensors + final norm, 9 per layer


def test_open_source_derives_the_run_config(tmp_path):
  """`porting.convert` compares the run config with what the checkpoint implies."""
  folder = save(full_model(), tmp_path / "full")
  run = p2s.Pix2StructConfig(hidden_size=32, num_layers=2, num_heads=4, head_dim=6, mlp_dim=40,
                             patch_size=4, seq_len=12, max_patches=MAX_PATCHES, image_size=20,
                             remat=True, dtype="bfloat16")
  overrides = {f: getattr(run, f) for f in p2s_port.RUN_FIELDS}
  reader, rules, derived = p2s_port.open_source(str(folder), run, overrides)
  with reader:
    assert derived == run
    assert mapping.plan(reader, rules, mapping.abstract_params(
        p2s.Pix2StructTower(run), jnp.zeros((1, 20, 20, 3))))[0]
