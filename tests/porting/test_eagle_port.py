"""EAGLE release → LEO-MINI (porting/eagle.py, `convert --eagle`), on a tiny release the
test writes itself the way EAGLE saves one: one HF folder holding the LLaMA, every expert
under `model.vision_tower.vision_towers.{i}.vision_tower.` and the mlp2x_gelu projector.

The JAX stage-2 model built from the converted checkpoint is checked against a PyTorch
composition of the same modules: experts → EAGLE's fusion (bilinear, align_corners=True,
to the common grid; channel concat) → projector → LLaMA.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.porting.conftest import reference_libraries

torch, transformers, timm = reference_libraries("torch", "transformers", "timm")

import torch.nn.functional as F  # noqa: E402

from configs import tiny  # noqa: E402
from leo_mini_jax import checkpoints as checkpoints_lib  # noqa: E402
from leo_mini_jax.batch import IMAGE_PLACEHOLDER_ID  # noqa: E402
from leo_mini_jax.porting import PortError  # noqa: E402
from leo_mini_jax.porting import convert  # noqa: E402
from leo_mini_jax.porting import eagle  # noqa: E402
from leo_mini_jax.training import checkpoint as checkpoint_lib  # noqa: E402
from leo_mini_jax.training import loop  # noqa: E402

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
RESOLUTION = 64


# The converter tests' randomiser (scale 0.15); tests/porting/conftest.py sets the precision.
from test_convert import _randomize  # noqa: E402


def run_config(stage: int, experts=None):
  """The tiny config with EAGLE's input resize (the release was trained with it)."""
  config = tiny.get_config(f"stage={stage}")
  config.model.image_resize = "eagle"
  if experts is not None:
    config.model.experts = experts
  config.data.resolution = RESOLUTION
  return config


# ------------------------------------------------------------------ the torch side


class TorchClip:
  """EAGLE's HRCLIPVisionTower forward: class token dropped before the pre-LayerNorm."""
  tower = "clip-448"

  def __init__(self, cfg):
    self.size = cfg["image_size"]
    self.model = _randomize(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        image_size=cfg["image_size"], patch_size=cfg["patch_size"],
        hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_layers"], num_attention_heads=cfg["num_heads"],
        hidden_act="quick_gelu", layer_norm_eps=1e-5)), 11)

  def __call__(self, x):
    vision = getattr(self.model, "vision_model", self.model)  # transformers 4.x / 5.x
    h = vision.embeddings(x)
    h = vision.pre_layrnorm(h[:, 1:])
    for layer in vision.encoder.layers:
      out = layer(h, None)
      h = out[0] if isinstance(out, tuple) else out
    return h  # [B, N, C]

  def state_dict(self):
    # Releases were saved with transformers 4.x, whose CLIPVisionModel nests `vision_model.`.
    return {(k if k.startswith("vision_model.") else "vision_model." + k): v
            for k, v in self.model.state_dict().items()}


class TorchConvNext:
  """EAGLE's ConvNextVisionTower forward: stem + stages, last stage's map."""
  tower = "convnext-1024"

  def __init__(self, cfg):
    self.size = cfg["image_size"]
    self.model = _randomize(timm.models.convnext.ConvNeXt(
        num_classes=0, depths=tuple(cfg["depths"]), dims=tuple(cfg["dims"]),
        ls_init_value=1.0, norm_eps=1e-5), 12)  # the config's eps (convnext_xxlarge's)

  def state_dict(self):
    return self.model.state_dict()

  def __call__(self, x):
    h = self.model.stem(x)
    for stage in self.model.stages:
      h = stage(h)
    return h  # [B, C, h, w]


class TorchEva02:
  """EAGLE's EVAVITVisionTower: the EVAViT backbone's last feature map."""
  tower = "det-1024"

  def __init__(self, cfg):
    import test_eva02_port as eva_ref  # the torch transcription of EAGLE's eva_vit.py
    self.size = cfg["image_size"]
    self.model = eva_ref.reference(
        seed=15, img_size=cfg["image_size"], patch_size=cfg["patch_size"],
        embed_dim=cfg["hidden_size"], depth=cfg["num_layers"], num_heads=cfg["num_heads"],
        mlp_ratio=cfg["intermediate_size"] / cfg["hidden_size"],
        pt_hw_seq_len=cfg["rope_pretrain_grid"], window_size=cfg["window_size"],
        window_block_indexes=tuple(cfg["window_block_indexes"]),
        pretrain_img_size=cfg["pretrain_grid"] * cfg["patch_size"])

  def state_dict(self):
    return self.model.state_dict()

  def __call__(self, x):
    return self.model(x)  # [B, C, h, w]


class TorchSam:
  """EAGLE's SAMVisionTower (short neck + pixel-unshuffle 2) around HF's SamVisionEncoder."""
  tower = "sam-1024"

  def __init__(self, cfg):
    import test_sam_port as sam_ref
    self.size = cfg["image_size"]
    vision = dict(hidden_size=cfg["hidden_size"], output_channels=cfg["output_channels"],
                  num_hidden_layers=cfg["num_layers"], num_attention_heads=cfg["num_heads"],
                  image_size=cfg["image_size"], patch_size=cfg["patch_size"],
                  window_size=cfg["window_size"],
                  global_attn_indexes=list(cfg["global_attn_indexes"]), mlp_dim=cfg["mlp_dim"])
    self.model = sam_ref.EagleSamTower(sam_ref.tiny_sam_model(vision, seed=16)).eval()

  def state_dict(self):
    return self.model.vision_tower.state_dict()

  def __call__(self, x):
    return self.model(x)  # [B, (g/2)², 4·C]


class TorchPix2Struct:
  """EAGLE's Pix2StructLargeVisionTower: de-normalise, the Pix2Struct processor, the HF
  encoder, the first grid² rows."""
  tower = "pix2struct-1024"

  def __init__(self, cfg):
    import test_pix2struct_port as p2s_ref
    self.size = cfg["image_size"]
    self.max_patches = cfg["max_patches"]
    self.patch = cfg["patch_size"]
    self.processor = p2s_ref.NUMPY_PROCESSOR
    self.model = p2s_ref.randomize_(transformers.Pix2StructVisionModel(
        transformers.Pix2StructVisionConfig(
            hidden_size=cfg["hidden_size"], patch_embed_hidden_size=3 * self.patch ** 2,
            d_ff=cfg["mlp_dim"], d_kv=cfg["head_dim"], num_hidden_layers=cfg["num_layers"],
            num_attention_heads=cfg["num_heads"], seq_len=cfg["seq_len"],
            dense_act_fn="gelu_new", layer_norm_eps=1e-6)), seed=17)

  def state_dict(self):
    return self.model.state_dict()

  def __call__(self, x):
    mean = torch.from_numpy(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.from_numpy(CLIP_STD).view(1, 3, 1, 1)
    images = ((x * std + mean) * 255.0).permute(0, 2, 3, 1).numpy()
    processor = self.processor(max_patches=self.max_patches,
                               patch_size={"height": self.patch, "width": self.patch})
    inputs = processor(images=list(images), return_tensors="pt", do_rescale=True)
    out = self.model(flattened_patches=inputs["flattened_patches"],
                     attention_mask=inputs["attention_mask"]).last_hidden_state
    side = int(inputs["attention_mask"][0].sum().item() ** 0.5)
    return out[:, :side * side]  # [B, grid², C]


TORCH_EXPERTS = {"clip": TorchClip, "convnext": TorchConvNext, "eva02": TorchEva02,
                 "sam": TorchSam, "pix2struct": TorchPix2Struct}

# Toy versions of EAGLE-X5's experts (its order), every one ending on or resized to the
# 4×4 fusion grid: EVA's grid 4 is padded to windows of 3, its position table was
# pretrained at grid 3; SAM's 8×8 map is pixel-unshuffled to 4×4.
TOY_X5 = [
    dict(name="clip", image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
         num_layers=2, num_heads=2, cls_token="drop"),
    dict(name="convnext", image_size=64, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32),
         ls_init_value=1.0),
    dict(name="sam", image_size=64, patch_size=8, hidden_size=32, mlp_dim=48, num_layers=2,
         num_heads=2, window_size=3, global_attn_indexes=(1,), output_channels=8,
         mean=tuple(CLIP_MEAN), std=tuple(CLIP_STD)),
    dict(name="eva02", image_size=32, patch_size=8, hidden_size=32, intermediate_size=42,
         num_layers=3, num_heads=2, window_size=3, window_block_indexes=(0, 1),
         pretrain_grid=3, rope_pretrain_grid=2, mean=tuple(CLIP_MEAN), std=tuple(CLIP_STD)),
    dict(name="pix2struct", image_size=64, hidden_size=32, num_layers=2, num_heads=2,
         head_dim=16, mlp_dim=40, patch_size=8, max_patches=16, seq_len=16),
]


def eagle_fusion(features, grid_size):
  """EAGLE's MultiBackboneChannelConcatenationVisionTower after the towers."""
  fused = []
  for feature in features:
    if feature.dim() == 3:
      b, n, c = feature.shape
      if n == grid_size ** 2:
        fused.append(feature)
        continue
      side = int(n ** 0.5)
      feature = feature.transpose(1, 2).reshape(b, c, side, side)
    if feature.shape[-1] != grid_size:
      feature = F.interpolate(feature, size=(grid_size, grid_size), mode="bilinear",
                              align_corners=True)
    fused.append(feature.flatten(2, 3).transpose(1, 2))
  return torch.cat(fused, dim=-1)


class TorchEagle:
  """The tiny release as PyTorch modules, plus its stage-2 forward."""

  def __init__(self, config):
    model = config.model
    llm = model.llm
    self.grid_size = model.reducer.grid_size
    self.experts = [TORCH_EXPERTS[e["name"]](dict(e)) for e in model.experts]
    self.llm = _randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=llm.vocab_size, hidden_size=llm.hidden_size,
        intermediate_size=llm.intermediate_size, num_hidden_layers=llm.num_layers,
        num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
        rope_theta=llm.rope_theta, rms_norm_eps=1e-5,
        max_position_embeddings=llm.max_position_embeddings,
        tie_word_embeddings=llm.tie_embeddings, attn_implementation="eager")), 13)
    self.mm_hidden = sum(self._feature_dim(e) for e in model.experts)
    self.projector = _randomize(torch.nn.Sequential(
        torch.nn.Linear(self.mm_hidden, llm.hidden_size), torch.nn.GELU(),
        torch.nn.Linear(llm.hidden_size, llm.hidden_size)), 14)

  @staticmethod
  def _feature_dim(expert):
    if expert["name"] == "convnext":
      return expert["dims"][-1]
    if expert["name"] == "sam":
      return expert["output_channels"] * 4
    return expert["hidden_size"]

  def state_dict(self, nested=False):
    state = {k: v for k, v in self.llm.state_dict().items()}
    for index, expert in enumerate(self.experts):
      prefix = eagle.tower_key_prefix(index, nested)
      state.update({prefix + k: v for k, v in expert.state_dict().items()})
    state.update({f"model.mm_projector.{k}": v for k, v in self.projector.state_dict().items()})
    return state

  def release_config(self, towers=None):
    hf = self.llm.config.to_dict()
    hf.update(architectures=["EagleLlamaForCausalLM"], model_type="eagle_llama",
              mm_vision_tower=";".join(towers or [e.tower for e in self.experts]),
              mm_projector_type="mlp2x_gelu", mm_hidden_size=self.mm_hidden,
              mm_vision_select_layer=-2, image_aspect_ratio="pad")
    return hf

  def save(self, folder, nested=False, towers=None, drop=(), extra=None):
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    # clone: EVA's rotary buffers are shared between blocks (safetensors refuses aliases).
    state = {k: v.detach().clone().contiguous() for k, v in self.state_dict(nested).items()
             if not any(k.startswith(d) for d in drop)}
    state.update(extra or {})
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(self.release_config(towers)))
    return folder

  @torch.no_grad()
  def logits(self, images_uint8, input_ids, placeholder_at):
    x = torch.from_numpy(((images_uint8 / 255.0 - CLIP_MEAN) / CLIP_STD).astype(np.float32))
    x = x.permute(0, 3, 1, 2)
    features = []
    for expert in self.experts:
      resized = x if expert.size == x.shape[-1] else F.interpolate(
          x, size=(expert.size, expert.size), mode="bilinear", align_corners=True)
      features.append(expert(resized))
    visual = self.projector(eagle_fusion(features, self.grid_size))
    ids = torch.from_numpy(input_ids.astype(np.int64))
    embed = self.llm.get_input_embeddings()
    before = embed(ids[:, :placeholder_at])
    after = embed(ids[:, placeholder_at + 1:])
    embeds = torch.cat([before, visual, after], dim=1)
    return self.llm(inputs_embeds=embeds).logits.numpy()


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  torch.manual_seed(0)
  model = TorchEagle(run_config(2))
  folder = model.save(tmp_path_factory.mktemp("eagle") / "Eagle-tiny")
  return model, folder


def _batch(config, seed=0, length=10, placeholder_at=3):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, config.model.llm.vocab_size, size=(2, length)).astype(np.int32)
  ids[:, placeholder_at] = IMAGE_PLACEHOLDER_ID
  images = rng.integers(0, 256, size=(2, RESOLUTION, RESOLUTION, 3)).astype(np.uint8)
  instruction = np.zeros_like(ids)
  instruction[:, :length // 2] = 1
  return {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids),
          "instruction_mask": instruction, "image": images,
          "has_image": np.ones((2,), np.int32)}


def _restore(config, out):
  model = loop.build_model(config)
  batch = loop.dummy_batch(config)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), batch))["params"]
  import flax.linen as nn
  params, fresh = checkpoints_lib.load_params(str(out), nn.meta.unbox(abstract))
  assert fresh == []
  return model, params


def test_stage2_logits_equal_the_torch_composition(release, tmp_path):
  torch_model, folder = release
  config = run_config(2)
  summary = convert.convert_eagle(config, str(folder), str(tmp_path / "out"))
  assert summary["left_for_init"] == []
  model, params = _restore(config, tmp_path / "out")
  batch = _batch(config)
  logits, _ = model.apply({"params": params}, {k: jnp.asarray(v) for k, v in batch.items()})
  ref = torch_model.logits(batch["image"], batch["input_ids"], placeholder_at=3)
  assert logits.shape == ref.shape
  np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4, rtol=1e-4)


def test_all_five_experts_stage2_logits_equal_the_torch_composition(tmp_path):
  """EAGLE-X5's expert set (CLIP, ConvNeXt, SAM, EVA-02, Pix2Struct) at toy size."""
  torch.manual_seed(1)
  config = run_config(2, TOY_X5)
  torch_model = TorchEagle(config)
  folder = torch_model.save(tmp_path / "Eagle-X5-tiny", nested=True)
  summary = convert.convert_eagle(config, str(folder), str(tmp_path / "out"))
  assert summary["left_for_init"] == []
  model, params = _restore(config, tmp_path / "out")
  batch = _batch(config, seed=3)
  logits, _ = jax.jit(model.apply)({"params": params},
                                   {k: jnp.asarray(v) for k, v in batch.items()})
  ref = torch_model.logits(batch["image"], batch["input_ids"], placeholder_at=3)
  np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4, rtol=1e-4)


def test_stage3_starts_from_the_release_with_cotr_and_mmoe_fresh(release, tmp_path):
  torch_model, folder = release
  del torch_model
  out = tmp_path / "stage3_init"
  summary = convert.convert_eagle(run_config(3), str(folder), str(out))
  left = summary["left_for_init"]
  assert left and all(p.startswith("reducer/") or "/mmoe_" in p for p in left), left
  assert any(p.startswith("reducer/") for p in left) and any("/mmoe_" in p for p in left)

  # train.py's own path: TrainSetup + initial_state with config.init_from.
  config = run_config(3)
  config.init_from = str(out)
  setup = loop.TrainSetup(config)
  state, how = loop.initial_state(
      setup, checkpoint_lib.Checkpointer(str(tmp_path / "work"), config.checkpoint), None)
  assert how.startswith(f"initialised from {out}"), how
  import orbax.checkpoint as ocp
  saved = ocp.PyTreeCheckpointer().restore(str(out))["params"]
  params = jax.device_get(state.params)
  np.testing.assert_array_equal(np.asarray(params["projector"]["fc1"]["kernel"]),
                                np.asarray(saved["projector"]["fc1"]["kernel"]))
  np.testing.assert_array_equal(
      np.asarray(params["llm"]["embed_tokens"]["embedding"]),
      torch_model_embedding(folder))


def torch_model_embedding(folder):
  from safetensors.numpy import load_file
  return load_file(str(folder / "model.safetensors"))["model.embed_tokens.weight"]


def test_nested_vision_tower_prefix_is_read(release, tmp_path):
  torch_model, _ = release
  folder = torch_model.save(tmp_path / "nested", nested=True)
  summary = convert.convert_eagle(run_config(2), str(folder), str(tmp_path / "out"))
  assert summary["left_for_init"] == []


def test_expert_order_mismatch_names_both_lists(release, tmp_path):
  torch_model, _ = release
  folder = torch_model.save(tmp_path / "swapped", towers=["convnext-1024", "clip-448"])
  with pytest.raises(ValueError, match=r"\['convnext', 'clip'\].*\['clip', 'convnext'\]"):
    convert.convert_eagle(run_config(2), str(folder), str(tmp_path / "out"))


def test_missing_and_unexpected_keys_are_named(release, tmp_path):
  torch_model, _ = release
  folder = torch_model.save(tmp_path / "broken", drop=("model.mm_projector.2.",),
                            extra={"model.image_newline": torch.zeros(4)})
  with pytest.raises(PortError) as err:
    convert.convert_eagle(run_config(2), str(folder), str(tmp_path / "out"))
  text = str(err.value)
  assert "model.mm_projector.2.weight" in text and "model.image_newline" in text


def test_not_an_eagle_release(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
  with pytest.raises(ValueError, match="mm_vision_tower is missing"):
    eagle.read_release(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"mm_vision_tower": "clip-448;dino-518"}))
  with pytest.raises(ValueError, match="dino-518"):
    eagle.read_release(tmp_path)


def test_cli(release, tmp_path):
  import os
  import subprocess
  import sys
  _, folder = release
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  result = subprocess.run(
      [sys.executable, "-m", "leo_mini_jax.porting.convert", "--config",
       "configs/tiny.py:stage=3", "--config.model.image_resize=eagle", "--eagle", str(folder),
       "--out", str(tmp_path / "cli")],
      cwd=repo, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "left for train.py to initialise" in result.stdout and "reducer/" in result.stdout
