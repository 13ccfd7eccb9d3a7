"""The paper's two models (configs/leo_mini_llama3_8b.py, configs/leo_mini_vicuna_7b.py):
built at full size from abstract shapes, expert by expert against the reference libraries'
own models on torch's meta device, and run at toy size with the same expert sets."""

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from configs import leo_mini_llama3_8b
from configs import leo_mini_vicuna_7b
from configs import tiny
from leo_mini_jax.models.leo_mini import LeoMini, LeoMiniConfig
from leo_mini_jax.models.vision import experts as experts_lib
from leo_mini_jax.batch import dummy_batch

PAPER = {
    "llama3_8b": (leo_mini_llama3_8b, ("clip", "convnext", "eva02", "pix2struct")),
    "vicuna_7b": (leo_mini_vicuna_7b, ("clip", "convnext", "sam", "eva02", "pix2struct")),
}
# Output tokens × channels of each paper expert (docs/design.md §2.1).
PAPER_FEATURES = {"clip": (576, 1024), "convnext": (1024, 3072), "eva02": (4096, 1024),
                  "pix2struct": (2025, 1536), "sam": (1024, 1024)}


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract_params(config):
  model = LeoMini(LeoMiniConfig.from_config(config.model))
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                       dummy_batch(config, batch_size=1))
  return model, nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), batch)["params"])


def _standalone_tower_count(name: str, cfg) -> int:
  """Parameters of the expert's tower built alone at its config (the per-expert port tests
  check these against the reference implementations)."""
  tower = experts_lib.expert_spec(name).module_cls(cfg)
  pixels = jax.ShapeDtypeStruct((1, cfg.input_size, cfg.input_size, 3), jnp.float32)
  return _count(jax.eval_shape(tower.init, jax.random.key(0), pixels)["params"])


@pytest.fixture(scope="module", params=sorted(PAPER))
def paper_stage2(request):
  module, names = PAPER[request.param]
  config = module.get_config("stage=2")
  model, params = _abstract_params(config)
  return request.param, config, model, params, names


def test_paper_configs_list_the_papers_experts_in_eagles_order(paper_stage2):
  _, config, model, params, names = paper_stage2
  assert model.config.expert_names == names
  assert set(params["vision"]) == set(names)
  for info in model.config.expert_infos:
    assert (info.num_tokens, info.feature_dim) == PAPER_FEATURES[info.name], info
  # Stage 2 fuses to EAGLE's 32×32 grid; the projector reads every expert's channels.
  assert model.config.num_visual_tokens == 1024
  assert params["projector"]["fc1"]["kernel"].shape == (
      sum(PAPER_FEATURES[n][1] for n in names), config.model.llm.hidden_size)
  for _, cfg in model.config.experts:  # bf16 compute, trained with remat in stage 2
    assert (cfg.dtype, cfg.param_dtype, cfg.remat) == ("bfloat16", "float32", True)


def test_each_experts_count_in_the_paper_model_is_its_towers(paper_stage2):
  _, _, model, params, _ = paper_stage2
  for name, cfg in model.config.experts:
    assert _count(params["vision"][name]) == _standalone_tower_count(name, cfg), name


def test_llm_counts_are_the_papers(paper_stage2):
  variant, _, _, params, _ = paper_stage2
  expected = {"llama3_8b": 8_030_261_248, "vicuna_7b": 6_738_415_616}[variant]
  assert _count(params["llm"]) == expected


torch = pytest.importorskip("torch")


def test_clip_and_convnext_counts_match_the_reference_libraries(paper_stage2):
  transformers = pytest.importorskip("transformers")
  timm = pytest.importorskip("timm")
  _, _, _, params, _ = paper_stage2
  with torch.device("meta"):
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
        num_hidden_layers=24, num_attention_heads=16, projection_dim=768))
    convnext = timm.create_model("convnext_xxlarge", pretrained=False, num_classes=0)
  # EAGLE's CLIP has no post-LayerNorm (HF applies it to the pooled class token only);
  # the ConvNeXt tower ends at the last stage (timm's head norm is not part of it).
  clip_reference = sum(p.numel() for n, p in clip.named_parameters() if "post_layernorm" not in n)
  convnext_reference = sum(p.numel() for n, p in convnext.named_parameters()
                           if not n.startswith("head."))
  assert _count(params["vision"]["clip"]) == clip_reference == 303_505_408
  assert _count(params["vision"]["convnext"]) == convnext_reference


# ----------------------------------------------------------- toy versions of the expert sets

TINY_EXPERTS = {
    "clip": dict(name="clip", image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                 num_layers=2, num_heads=2),
    "convnext": dict(name="convnext", image_size=64, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)),
    # grid 5 (not a multiple of the window 2), position table pretrained at grid 3
    "eva02": dict(name="eva02", image_size=40, patch_size=8, hidden_size=32,
                  intermediate_size=40, num_layers=3, num_heads=2, window_size=2,
                  window_block_indexes=(0, 1), pretrain_grid=3, rope_pretrain_grid=2),
    "pix2struct": dict(name="pix2struct", image_size=64, hidden_size=32, num_layers=2,
                       num_heads=2, head_dim=16, mlp_dim=48, patch_size=8, max_patches=36,
                       seq_len=64),
    "sam": dict(name="sam", image_size=48, patch_size=8, hidden_size=32, mlp_dim=64,
                num_layers=2, num_heads=2, window_size=4, global_attn_indexes=(1,),
                output_channels=16),
}


@pytest.mark.parametrize("variant", sorted(PAPER))
@pytest.mark.parametrize("stage", [2, 3])
def test_toy_expert_sets_build_and_run(variant, stage):
  names = PAPER[variant][1]
  config = tiny.get_config(f"stage={stage},tokens=4")
  config.model.experts = [TINY_EXPERTS[n] for n in names]
  config.model.image_resize = "eagle"
  model = LeoMini(LeoMiniConfig.from_config(config.model))
  batch = {k: jnp.asarray(v) for k, v in dummy_batch(config, batch_size=2).items()}
  variables = jax.jit(model.init)(jax.random.key(0), batch)
  logits, aux = jax.jit(model.apply)(variables, batch)
  visual = 16 if stage == 2 else 4  # 4×4 fusion grid / N^V
  assert aux["num_visual_tokens"] == visual
  assert logits.shape == (2, batch["input_ids"].shape[1] + visual - 1,
                          config.model.llm.vocab_size)
  assert np.isfinite(np.asarray(logits)).all()
  params = variables["params"]
  assert set(params["vision"]) == set(names)
  dims = [info.feature_dim for info in model.config.expert_infos]
  assert params["projector"]["fc1"]["kernel"].unbox().shape[0] == sum(dims)
  if stage == 3:  # CoTR holds parameters for every expert
    reducer_paths = "\n".join(traverse_util.flatten_dict(nn.meta.unbox(params["reducer"]),
                                                         sep="/"))
    assert all(n in reducer_paths for n in names), reducer_paths


def test_full_size_experts_remat_only_when_they_train():
  assert all(e["remat"] for e in common.full_size_experts("vicuna_7b", 2))
  assert not any(e["remat"] for e in common.full_size_experts("vicuna_7b", 3))
