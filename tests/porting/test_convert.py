"""The conversion CLI (leo_mini_jax/porting/convert.py) on tiny checkpoints, and train.py's
`init_from` reading what it writes."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.porting.conftest import randomize_, reference_libraries

torch, transformers, timm = reference_libraries("torch", "transformers", "timm")

from configs import tiny  # noqa: E402  pylint: disable=g-import-not-at-top
from leo_mini_jax.models import llama as llama_lib  # noqa: E402
from leo_mini_jax.porting import PortError  # noqa: E402
from leo_mini_jax.porting import convert  # noqa: E402
from leo_mini_jax.porting import mapping  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The shapes of configs/tiny.py (stage 1), in the HF configs' field names.
_TINY = tiny.get_config("stage=1").model
LLM = dict(vocab_size=_TINY.llm.vocab_size, hidden_size=_TINY.llm.hidden_size,
           intermediate_size=_TINY.llm.intermediate_size,
           num_hidden_layers=_TINY.llm.num_layers, num_attention_heads=_TINY.llm.num_heads,
           num_key_value_heads=_TINY.llm.num_kv_heads, rope_theta=_TINY.llm.rope_theta,
           rms_norm_eps=1e-5, max_position_embeddings=_TINY.llm.max_position_embeddings,
           tie_word_embeddings=_TINY.llm.tie_embeddings)
_CLIP, _CONVNEXT = _TINY.experts
CLIP = dict(image_size=_CLIP["image_size"], patch_size=_CLIP["patch_size"],
            hidden_size=_CLIP["hidden_size"], intermediate_size=_CLIP["intermediate_size"],
            num_hidden_layers=_CLIP["num_layers"], num_attention_heads=_CLIP["num_heads"],
            hidden_act="quick_gelu", layer_norm_eps=1e-5)
CONVNEXT = dict(depths=tuple(_CONVNEXT["depths"]), dims=tuple(_CONVNEXT["dims"]))
IDS = np.random.default_rng(0).integers(0, 320, size=(2, 9)).astype(np.int32)


def _randomize(model, seed):
  return randomize_(model, seed, scale=0.15)


def write_checkpoints(root, llm=None, clip=None):
  """Tiny HF LLaMA and CLIP folders and a timm ConvNeXt safetensors file under `root`."""
  from safetensors.torch import save_file
  torch.manual_seed(0)
  hf_llm = _randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(
      **dict(LLM, **(llm or {})), attn_implementation="eager")), 1)
  hf_llm.save_pretrained(root / "llm")
  hf_clip = _randomize(transformers.CLIPVisionModel(
      transformers.CLIPVisionConfig(**dict(CLIP, **(clip or {})))), 2)
  hf_clip.save_pretrained(root / "clip")
  convnext = _randomize(timm.models.convnext.ConvNeXt(num_classes=0, **CONVNEXT), 3)
  (root / "convnext").mkdir()
  save_file({k: v.contiguous() for k, v in convnext.state_dict().items()},
            str(root / "convnext" / "model.safetensors"))
  return hf_llm, hf_clip, convnext


def _paths(root):
  return {"clip": str(root / "clip"), "convnext": str(root / "convnext")}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("ckpts")
  return root, write_checkpoints(root)


def _check_params_are_the_sources(params, hf_llm, hf_clip, convnext, llm_config):
  """Every ported part against its PyTorch source: LLM logits, expert tensors by value."""
  with torch.no_grad():
    ref = hf_llm(torch.from_numpy(IDS).long()).logits.numpy()
  ours = llama_lib.LlamaForCausalLM(llm_config).apply({"params": params["llm"]}, IDS)
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=1e-4)
  vm = getattr(hf_clip, "vision_model", hf_clip)
  np.testing.assert_array_equal(
      params["vision"]["clip"]["patch_embedding"]["kernel"],
      vm.embeddings.patch_embedding.weight.detach().numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      params["vision"]["clip"]["layers"]["mlp"]["fc2"]["kernel"][1],
      vm.encoder.layers[1].mlp.fc2.weight.detach().numpy().T)
  np.testing.assert_array_equal(params["vision"]["convnext"]["stem"]["conv"]["kernel"],
                                convnext.stem[0].weight.detach().numpy().transpose(2, 3, 1, 0))


def test_cli_writes_a_checkpoint_train_starts_stage1_from(checkpoints, tmp_path):
  root, (hf_llm, hf_clip, convnext) = checkpoints
  out = tmp_path / "ported"
  result = subprocess.run(
      [sys.executable, "-m", "leo_mini_jax.porting.convert", "--config", "configs/tiny.py:stage=1",
       "--llm", str(root / "llm"), "--expert", f"clip={root / 'clip'}",
       "--expert", f"convnext={root / 'convnext'}", "--out", str(out)],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "left for train.py to initialise" in result.stdout and "projector/fc1/kernel" in result.stdout

  # train.py's own path: TrainSetup + initial_state with config.init_from
  from leo_mini_jax.training import checkpoint as checkpoint_lib
  from leo_mini_jax.training import loop
  config = tiny.get_config("stage=1")
  config.init_from = str(out)
  setup = loop.TrainSetup(config)
  state, how = loop.initial_state(
      setup, checkpoint_lib.Checkpointer(str(tmp_path / "work"), config.checkpoint), None)
  assert how.startswith(f"initialised from {out}") and "fresh" in how
  params = jax.device_get(state.params)
  _check_params_are_the_sources(params, hf_llm, hf_clip, convnext, setup.model.config.llm)
  assert params["projector"]["fc1"]["kernel"].shape == (
      CLIP["hidden_size"] + CONVNEXT["dims"][-1], LLM["hidden_size"])  # fresh, present


def test_in_process_conversion_keeps_only_ported_params(checkpoints, tmp_path):
  root, (hf_llm, hf_clip, convnext) = checkpoints
  summary = convert.convert_checkpoints(tiny.get_config("stage=1"), root / "llm", _paths(root),
                                        tmp_path / "out")
  assert summary["left_for_init"] == ["projector/fc1/bias", "projector/fc1/kernel",
                                      "projector/fc2/bias", "projector/fc2/kernel"]
  import orbax.checkpoint as ocp
  saved = ocp.PyTreeCheckpointer().restore(str(tmp_path / "out"))["params"]
  assert sorted(saved) == ["llm", "vision"] and sorted(saved["vision"]) == ["clip", "convnext"]
  llm_config = convert.build_model_config(tiny.get_config("stage=1")).llm
  _check_params_are_the_sources(saved, hf_llm, hf_clip, convnext, llm_config)


def test_stage3_config_leaves_reducer_and_mmoe_for_init(checkpoints, tmp_path):
  root, _ = checkpoints
  summary = convert.convert_checkpoints(tiny.get_config("stage=3"), root / "llm", _paths(root),
                                        tmp_path / "out")
  left = summary["left_for_init"]
  assert any(p.startswith("reducer/") for p in left)
  assert any("/mmoe_" in p and p.startswith("llm/") for p in left)
  assert all(p.startswith(("projector/", "reducer/", "llm/")) for p in left)


def test_architecture_disagreements_are_all_named(tmp_path):
  write_checkpoints(tmp_path, llm={"rope_theta": 500000.0, "rms_norm_eps": 1e-6},
                    clip={"hidden_act": "gelu"})
  with pytest.raises(ValueError) as info:
    convert.convert_checkpoints(tiny.get_config("stage=1"), tmp_path / "llm", _paths(tmp_path),
                                tmp_path / "out")
  msg = str(info.value)
  for needle in ("model.llm.rope_theta", "500000.0", "model.llm.rms_norm_eps",
                 "model.experts[clip].hidden_act", "'gelu'"):
    assert needle in msg, (needle, msg)
  assert not (tmp_path / "out").exists()


def test_missing_and_renamed_tensors_across_checkpoints_in_one_report(tmp_path):
  from safetensors.torch import load_file, save_file
  write_checkpoints(tmp_path)
  llm_file = str(tmp_path / "llm" / "model.safetensors")
  state = load_file(llm_file)
  state["model.layers.1.mlp.up_prj.weight"] = state.pop("model.layers.1.mlp.up_proj.weight")
  save_file(state, llm_file)
  clip_file = str(tmp_path / "clip" / "model.safetensors")
  state = load_file(clip_file)
  key = [k for k in state if k.endswith("encoder.layers.0.layer_norm1.bias")][0]
  del state[key]
  save_file(state, clip_file)
  with pytest.raises(PortError) as info:
    convert.convert_checkpoints(tiny.get_config("stage=1"), tmp_path / "llm", _paths(tmp_path),
                                tmp_path / "out")
  msg = str(info.value)
  for needle in ("llm:model.layers.1.mlp.up_prj.weight", "llm/layers/mlp/up_proj/kernel[layer=1]",
                 "vision/clip/layers/layer_norm1/bias[layer=0]"):
    assert needle in msg, (needle, msg)
  assert "projector" not in msg


def test_expert_paths_must_name_experts_of_the_config(checkpoints, tmp_path):
  root, _ = checkpoints
  with pytest.raises(ValueError, match=r"--expert sam=\.\.\. names an expert the config does not"):
    convert.convert_checkpoints(tiny.get_config("stage=1"), root / "llm",
                                dict(_paths(root), sam=str(root / "clip")), tmp_path / "out")


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "leo_mini_jax.porting.convert", *args],
                        cwd=REPO, capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_cli_ports_the_llm_alone_and_initialises_the_experts_as_train_py_would(
    checkpoints, tmp_path):
  root, (hf_llm, _, _) = checkpoints
  out = tmp_path / "llm_only"
  result = _cli("--config", "configs/tiny.py:stage=1", "--llm", str(root / "llm"),
                "--out", str(out))
  assert result.returncode == 0, result.stderr[-3000:]
  # the fresh experts are named, and absl/orbax INFO lines (I1206 ...) are not printed
  assert "initialised fresh" in result.stdout, result.stdout
  assert "vision/clip (" in result.stdout and "vision/convnext (" in result.stdout
  info_lines = [line for line in result.stderr.splitlines() if line[:1] == "I" and
                line[1:5].isdigit()]
  assert not info_lines, info_lines[:5]

  from leo_mini_jax.training import checkpoint as checkpoint_lib
  from leo_mini_jax.training import loop
  config = tiny.get_config("stage=1")
  config.init_from = str(out)
  setup = loop.TrainSetup(config)
  state, how = loop.initial_state(
      setup, checkpoint_lib.Checkpointer(str(tmp_path / "work"), config.checkpoint), None)
  assert how.startswith(f"initialised from {out}")
  params = jax.device_get(state.params)
  with torch.no_grad():
    ref = hf_llm(torch.from_numpy(IDS).long()).logits.numpy()
  ours = llama_lib.LlamaForCausalLM(setup.model.config.llm).apply({"params": params["llm"]}, IDS)
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=1e-4)
  # the experts hold what a fresh train.py run at config.seed starts with (to an ulp: the
  # two init programs are compiled separately)
  expert_paths = [p for p in mapping.flatten_tree(params) if p.startswith("vision/")]
  fresh = jax.device_get(setup.init_params_subset(expert_paths, config.seed))
  flat = mapping.flatten_tree(params)
  for path in expert_paths:
    np.testing.assert_allclose(flat[path], fresh[path], rtol=1e-6, atol=1e-7, err_msg=path)


def test_cli_errors_are_short_messages_without_traceback(tmp_path):
  result = _cli("--config", "configs/tiny.py:stage=1", "--llm", str(tmp_path / "no_llm"),
                "--out", str(tmp_path / "out"))
  assert result.returncode == 1
  assert "Traceback" not in result.stderr, result.stderr
  message = [line for line in result.stderr.splitlines() if line.startswith("convert: ")]
  assert len(message) == 1 and str(tmp_path / "no_llm") in message[0], result.stderr
  verbose = _cli("--config", "configs/tiny.py:stage=1", "--llm", str(tmp_path / "no_llm"),
                 "--out", str(tmp_path / "out"), "--verbose")
  assert verbose.returncode != 0 and "Traceback" in verbose.stderr


@pytest.mark.slow
def test_train_py_runs_two_steps_from_the_ported_checkpoint(checkpoints, tmp_path):
  root, _ = checkpoints
  convert.convert_checkpoints(tiny.get_config("stage=1"), root / "llm", _paths(root),
                              tmp_path / "ported")
  result = subprocess.run(
      [sys.executable, "train.py", "--config", "configs/tiny.py:stage=1",
       "--workdir", str(tmp_path / "work"), f"--config.init_from={tmp_path / 'ported'}",
       "--config.total_steps=2", "--config.data.num_train=64", "--config.data.batch_size=4"],
      cwd=REPO, capture_output=True, text=True, timeout=900,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "stage 1: step 2 loss" in result.stdout
  # Stage 1 freezes the LLM and the experts: after two steps they are still the ported ones.
  import orbax.checkpoint as ocp
  ported = ocp.PyTreeCheckpointer().restore(str(tmp_path / "ported"))["params"]
  trained = ocp.PyTreeCheckpointer().restore(
      str(tmp_path / "work" / "checkpoints" / "2" / "state"))["params"]
  flat = lambda t: {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(t)}
  ported, trained_llm_vision = flat(ported), flat({k: trained[k] for k in ("llm", "vision")})
  assert sorted(ported) == sorted(trained_llm_vision)
  for key, value in ported.items():
    np.testing.assert_array_equal(trained_llm_vision[key], value, err_msg=key)


def test_load_vision_expert_dispatches_to_the_expert_ports(checkpoints):
  from leo_mini_jax.porting import load_vision_expert
  root, (_, hf_clip, convnext) = checkpoints
  x = np.random.default_rng(0).standard_normal((1, 32, 32, 3)).astype(np.float32)
  clip_model, clip_params = load_vision_expert("clip", root / "clip")
  with torch.no_grad():
    ref = hf_clip(torch.from_numpy(x).permute(0, 3, 1, 2)).last_hidden_state[:, 1:].numpy()
  np.testing.assert_allclose(np.asarray(clip_model.apply({"params": clip_params}, x)), ref,
                             atol=1e-4, rtol=1e-4)
  conv_model, conv_params = load_vision_expert("convnext", root / "convnext", image_size=32,
                                               layer_norm_eps=1e-6)  # timm's default eps
  with torch.no_grad():
    feats = convnext.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2))
  ref = feats.permute(0, 2, 3, 1).reshape(1, -1, feats.shape[1]).numpy()
  np.testing.assert_allclose(np.asarray(conv_model.apply({"params": conv_params}, x)), ref,
                             atol=1e-4, rtol=1e-4)
  with pytest.raises(ValueError, match="unknown vision expert 'nope'"):
    load_vision_expert("nope", root / "clip")
