"""Parity of leo_mini_jax/porting/llama.py against transformers' LlamaForCausalLM (tiny, random)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from leo_mini_jax.models import llama as llama_lib
from leo_mini_jax.porting import PortError, load_llm
from leo_mini_jax.porting import llama as port

from tests.porting.conftest import reference_libraries

torch, transformers = reference_libraries("torch", "transformers")

LLAMA2 = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5,
              rope_theta=10000.0, max_position_embeddings=64)
LLAMA3 = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
              rope_theta=500000.0, max_position_embeddings=64,
              # tiny original context so the scaling changes every frequency band we have
              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 16})


def make_hf(fields, tie=False, seed=0):
  """A random HF LlamaForCausalLM with weights far from init (norms ≠ 1) in float32."""
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(**fields, tie_word_embeddings=tie,
                                    attn_implementation="eager")
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.15 * torch.randn_like(p))
  return model


def hf_logits(model, ids):
  with torch.no_grad():
    return model(torch.from_numpy(ids).long()).logits.float().numpy()


IDS = np.random.default_rng(0).integers(0, 128, size=(2, 12)).astype(np.int32)


@pytest.mark.parametrize("fields,tie,scan", [
    (LLAMA2, False, True),
    (LLAMA2, True, False),
    (LLAMA3, False, True),
    (LLAMA3, False, False),
], ids=["llama2-untied-scan", "llama2-tied-unscanned", "llama3-gqa-scan", "llama3-gqa-unscanned"])
def test_logits_match_transformers(tmp_path, fields, tie, scan):
  hf = make_hf(fields, tie)
  hf.save_pretrained(tmp_path)
  model, params, config = load_llm(tmp_path, scan_layers=scan)
  assert config.tie_embeddings == tie and ("lm_head" in params) == (not tie)
  if fields is LLAMA3:
    assert config.num_kv_heads == 2 and config.rope_scaling is not None
    # the scaling must matter for this test to prove anything
    unscaled = port.config_from_hf(tmp_path, rope_scaling=None)
    assert not np.allclose(llama_lib.rope_inverse_frequencies(config),
                           llama_lib.rope_inverse_frequencies(unscaled))
  ours = np.asarray(model.apply({"params": params}, jnp.asarray(IDS)))
  ref = hf_logits(hf, IDS)
  assert ours.shape == ref.shape == (2, 12, 128)
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


def test_sharded_checkpoint_with_index(tmp_path):
  hf = make_hf(LLAMA3, seed=1)
  hf.save_pretrained(tmp_path, max_shard_size="20KB")
  assert os.path.exists(tmp_path / "model.safetensors.index.json")
  assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 2
  model, params, _ = load_llm(tmp_path)
  np.testing.assert_allclose(np.asarray(model.apply({"params": params}, IDS)),
                             hf_logits(hf, IDS), atol=1e-4, rtol=1e-4)


def test_bf16_checkpoint(tmp_path):
  hf = make_hf(LLAMA3, seed=2).to(torch.bfloat16)
  hf.save_pretrained(tmp_path)
  # bf16 params keep the checkpoint's exact bits
  _, params16, _ = load_llm(tmp_path, param_dtype="bfloat16")
  q = params16["layers"]["attention"]["q_proj"]["kernel"]
  assert q.dtype == jnp.bfloat16
  ref_q = hf.model.layers[1].self_attn.q_proj.weight.detach().float().numpy().T
  np.testing.assert_array_equal(np.asarray(q[1], np.float32), ref_q)
  # f32 params from bf16 weights reproduce HF's f32 computation on the same weights
  model, params, _ = load_llm(tmp_path, param_dtype="float32")
  assert params["lm_head"]["kernel"].dtype == jnp.float32
  # (a fresh f32 model: casting `hf` back would keep its bf16-rounded rotary buffers)
  ref = make_hf(LLAMA3)
  ref.load_state_dict({k: v.float() for k, v in hf.state_dict().items()})
  np.testing.assert_allclose(np.asarray(model.apply({"params": params}, IDS)),
                             hf_logits(ref, IDS), atol=1e-4, rtol=1e-4)


def test_pytorch_bin_checkpoint(tmp_path):
  hf = make_hf(LLAMA2, seed=3)
  hf.config.save_pretrained(tmp_path)
  torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
  model, params, _ = load_llm(tmp_path)
  np.testing.assert_allclose(np.asarray(model.apply({"params": params}, IDS)),
                             hf_logits(hf, IDS), atol=1e-4, rtol=1e-4)


def _save_state(tmp_path, hf, state):
  from safetensors.torch import save_file
  hf.config.save_pretrained(tmp_path)
  save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))


def test_renamed_and_missing_keys_are_all_named(tmp_path):
  hf = make_hf(LLAMA2)
  state = dict(hf.state_dict())
  state["model.layers.1.mlp.gate_prj.weight"] = state.pop("model.layers.1.mlp.gate_proj.weight")
  del state["model.layers.0.self_attn.k_proj.weight"]
  del state["model.norm.weight"]
  _save_state(tmp_path, hf, state)
  with pytest.raises(PortError) as info:
    load_llm(tmp_path)
  msg = str(info.value)
  for needle in ("model.layers.1.mlp.gate_prj.weight",  # unexpected, by name
                 "layers/mlp/gate_proj/kernel[layer=1]", "model.layers.1.mlp.gate_proj.weight",
                 "layers/attention/k_proj/kernel[layer=0]", "model.layers.0.self_attn.k_proj.weight",
                 "final_norm/scale", "model.norm.weight"):
    assert needle in msg, (needle, msg)
  assert len(info.value.missing) == 3 and len(info.value.unexpected) == 1


def test_shape_mismatch_against_config_is_named(tmp_path):
  hf = make_hf(LLAMA2)
  state = dict(hf.state_dict())
  state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"][:32]
  _save_state(tmp_path, hf, state)
  with pytest.raises(PortError, match=r"layers/mlp/up_proj/kernel\[layer=0\].*\(32, 32\)"):
    load_llm(tmp_path)


def test_untied_config_without_lm_head_fails(tmp_path):
  hf = make_hf(LLAMA2)
  state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
  _save_state(tmp_path, hf, state)
  with pytest.raises(PortError, match="lm_head/kernel"):
    load_llm(tmp_path)


# ---------------------------------------------------------------------------- config.json forms


HF4_LLAMA3 = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": False,
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "torch_dtype": "bfloat16",
}


def test_config_forms_4x_and_5x_agree(tmp_path):
  four = port.config_from_hf(HF4_LLAMA3)
  legacy = dict(HF4_LLAMA3, rope_scaling=dict(HF4_LLAMA3["rope_scaling"]))
  legacy["rope_scaling"]["type"] = legacy["rope_scaling"].pop("rope_type")
  assert port.config_from_hf(legacy) == four
  # transformers 5 writes rope_parameters; take its own serialisation of the same config
  fields = {k: v for k, v in HF4_LLAMA3.items() if k not in ("architectures", "torch_dtype")}
  transformers.LlamaConfig(**fields).save_pretrained(tmp_path)
  written = json.load(open(tmp_path / "config.json"))
  assert "rope_parameters" in written and "rope_scaling" not in written
  five = port.config_from_hf(tmp_path)
  assert five == four
  assert four.rope_theta == 500000.0 and four.num_kv_heads == 8 and four.head_dim is None
  assert four.rope_scaling == llama_lib.RopeScaling(8.0, 1.0, 4.0, 8192)
  # Llama-2 style: no scaling, in both forms
  two = dict(HF4_LLAMA3, rope_theta=10000.0, rope_scaling=None, num_key_value_heads=32)
  five_two = {k: v for k, v in two.items() if k not in ("rope_theta", "rope_scaling")}
  five_two["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
  assert port.config_from_hf(two) == port.config_from_hf(five_two)
  assert port.config_from_hf(two).rope_scaling is None
  assert port.config_from_hf(two).num_kv_heads is None


@pytest.mark.parametrize("change,needle", [
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "'linear'"),
    ({"rope_scaling": None, "rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                                                "rope_theta": 1e4}}, "'yarn'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"model_type": "gpt2"}, "gpt2"),
])
def test_unsupported_features_fail_by_name(change, needle):
  with pytest.raises(ValueError, match=needle):
    port.config_from_hf(dict(HF4_LLAMA3, **change))


def test_missing_config_json_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_llm(tmp_path)


# ---------------------------------------------------------------------------- tokenizer


def _write_tokenizer(folder, specials, words=("hello", "world")):
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {t: i for i, t in enumerate([*specials, *words])}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=specials[0]))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens(list(specials))
  os.makedirs(folder, exist_ok=True)
  tok.save(os.path.join(folder, "tokenizer.json"))
  return vocab


def test_tokenizer_and_template_follow_the_family(tmp_path):
  from leo_mini_jax.porting.tokenizer import load_tokenizer
  llama3 = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>")
  vocab = _write_tokenizer(tmp_path / "l3", llama3)
  config = port.config_from_hf(dict(HF4_LLAMA3, vocab_size=128))
  tok, template = load_tokenizer(tmp_path / "l3", config)
  assert template == "llama3"
  assert tok.bos_id == vocab["<|begin_of_text|>"] and tok.eos_id == vocab["<|end_of_text|>"]
  assert tok.encode("hello world") == [vocab["hello"], vocab["world"]]
  _write_tokenizer(tmp_path / "v", ("<unk>", "<s>", "</s>"))
  assert load_tokenizer(tmp_path / "v")[1] == "vicuna_v1"
  with pytest.raises(ValueError, match="embedding table has only 4 rows"):
    load_tokenizer(tmp_path / "l3", port.config_from_hf(dict(HF4_LLAMA3, vocab_size=4)))
