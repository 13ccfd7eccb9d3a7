"""Tests for leo_mini_jax/porting/export.py: HF → JAX → HF is bit-exact and loads in transformers."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from leo_mini_jax.models import llama as llama_lib
from leo_mini_jax.porting import export, load_llm, open_checkpoint
from leo_mini_jax.porting import llama as port

from tests.porting.conftest import reference_libraries

torch, transformers = reference_libraries("torch", "transformers")

from test_llama_port import IDS, LLAMA2, LLAMA3, hf_logits, make_hf  # noqa: E402  pylint: disable=g-import-not-at-top


def _all_tensors(folder):
  """{key: (dtype name, shape, raw bytes)} of every tensor in a folder, via our reader."""
  reader = open_checkpoint(folder)
  return {k: (str(reader.dtype(k)), reader.shape(k), reader.get(k).tobytes()) for k in reader.keys()}


@pytest.mark.parametrize("fields,tie,scan,torch_dtype", [
    (LLAMA3, False, True, torch.float32),
    (LLAMA2, True, False, torch.float32),
    (LLAMA3, False, True, torch.bfloat16),
], ids=["llama3-f32-scan", "llama2-tied-f32-unscanned", "llama3-bf16"])
def test_round_trip_is_bit_exact_and_loads_in_transformers(tmp_path, fields, tie, scan,
                                                           torch_dtype):
  hf = make_hf(fields, tie).to(torch_dtype)
  hf.save_pretrained(tmp_path / "hf")
  dtype = "bfloat16" if torch_dtype == torch.bfloat16 else "float32"
  _, params, config = load_llm(tmp_path / "hf", param_dtype=dtype, scan_layers=scan)
  written = export.export_llm(params, config, tmp_path / "out")
  assert os.path.join(tmp_path / "out", "model.safetensors") in written
  original, exported = _all_tensors(tmp_path / "hf"), _all_tensors(tmp_path / "out")
  assert sorted(exported) == sorted(original)
  for key in original:
    assert exported[key] == original[key], key
  # transformers reads the folder (config.json in the 4.x form) and computes the same logits
  cfg = json.load(open(tmp_path / "out" / "config.json"))
  assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
  assert cfg["torch_dtype"] == dtype and "rope_parameters" not in cfg
  reloaded = transformers.LlamaForCausalLM.from_pretrained(
      tmp_path / "out", attn_implementation="eager").eval()
  assert reloaded.dtype == torch_dtype
  # (reference: the original folder loaded the same way; `hf` itself carries rotary buffers
  # rounded by .to(bfloat16), which from_pretrained recomputes)
  original_model = transformers.LlamaForCausalLM.from_pretrained(
      tmp_path / "hf", attn_implementation="eager").eval()
  np.testing.assert_array_equal(hf_logits(reloaded, IDS), hf_logits(original_model, IDS))
  # and our reader of the exported folder gives back the same config
  assert port.config_from_hf(tmp_path / "out", param_dtype=dtype, scan_layers=scan) == config


def test_sharded_export_with_index(tmp_path):
  hf = make_hf(LLAMA3, seed=4)
  hf.save_pretrained(tmp_path / "hf")
  _, params, config = load_llm(tmp_path / "hf")
  export.export_llm(params, config, tmp_path / "out", max_shard_size="20KB")
  names = sorted(os.listdir(tmp_path / "out"))
  shards = [n for n in names if n.endswith(".safetensors")]
  assert len(shards) > 2 and "model.safetensors.index.json" in names
  index = json.load(open(tmp_path / "out" / "model.safetensors.index.json"))
  for shard in shards:  # each shard within the limit unless it holds a single bigger tensor
    tensors = load_file(str(tmp_path / "out" / shard))
    size = sum(t.nbytes for t in tensors.values())
    assert size <= 20_000 or len(tensors) == 1
    assert all(index["weight_map"][k] == shard for k in tensors)
  assert index["metadata"]["total_size"] == sum(
      np.prod(s) * 4 for _, s, _ in _all_tensors(tmp_path / "out").values())
  reloaded = transformers.LlamaForCausalLM.from_pretrained(
      tmp_path / "out", attn_implementation="eager").eval()
  np.testing.assert_allclose(hf_logits(reloaded, IDS), hf_logits(hf, IDS), atol=1e-6, rtol=0)
  # a second, unsharded export into the same folder removes the stale shards
  export.export_llm(params, config, tmp_path / "out")
  assert [n for n in os.listdir(tmp_path / "out") if n.startswith("model")] == ["model.safetensors"]


def test_cast_on_export(tmp_path):
  hf = make_hf(LLAMA2, seed=5)
  hf.save_pretrained(tmp_path / "hf")
  _, params, config = load_llm(tmp_path / "hf")
  export.export_llm(params, config, tmp_path / "out", dtype="bfloat16")
  got = open_checkpoint(tmp_path / "out").get("model.layers.1.mlp.down_proj.weight")
  want = hf.model.layers[1].mlp.down_proj.weight.detach().to(torch.bfloat16)
  np.testing.assert_array_equal(got.view(np.uint16), want.view(torch.int16).numpy().view(np.uint16))
  assert json.load(open(tmp_path / "out" / "config.json"))["torch_dtype"] == "bfloat16"


def test_parameters_outside_the_layout_are_named(tmp_path):
  config = port.config_from_hf(dict(LLAMA2, model_type="llama"), scan_layers=True)
  params = llama_lib.LlamaForCausalLM(config).init(jax.random.key(0), IDS[:, :2])["params"]
  params = jax.tree.map(np.asarray, nn.meta.unbox(params))
  params["layers"]["mlp"]["mmoe_up_proj"] = {"lora_a": np.zeros((2, 3), np.float32)}
  params["extra"] = {"w": np.zeros(2, np.float32)}
  with pytest.raises(ValueError, match="2 parameter") as info:
    export.export_llm(params, config, tmp_path / "out")
  assert "layers/mlp/mmoe_up_proj/lora_a" in str(info.value) and "extra/w" in str(info.value)
  export.export_llm(params, config, tmp_path / "out", exclude=r".*mmoe_.*|extra/.*")
  assert "model.layers.0.mlp.up_proj.weight" in open_checkpoint(tmp_path / "out").keys()


def test_parse_size():
  assert export.parse_size("5GB") == 5 * 10**9
  assert export.parse_size("2GiB") == 2 * 2**30
  assert export.parse_size("20KB") == 20_000
  assert export.parse_size(123) == 123
  with pytest.raises(ValueError, match="max_shard_size"):
    export.parse_size("lots")


def _word_tokenizer(path):
  """A tiny word-level tokenizer.json with Llama-2's special names, alone in its folder
  (as `data.tokenizer=.../tokenizer.json` may name it): no tokenizer_config.json."""
  import tokenizers  # pylint: disable=import-outside-toplevel
  words = "what colour is the shape ? red blue green square circle".split()
  vocab = {name: i for i, name in enumerate(["<unk>", "<s>", "</s>", *words])}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.decoder = tokenizers.decoders.WordPiece()
  tok.add_special_tokens(["<unk>", "<s>", "</s>"])
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tok.save(str(path))
  return path


@pytest.mark.parametrize("given", ["file", "folder"])
def test_export_writes_a_tokenizer_auto_classes_load(tmp_path, given):
  from leo_mini_jax.data import tokenizers as tokenizers_lib
  vocab_file = _word_tokenizer(tmp_path / "tok" / "tokenizer.json")
  hf = make_hf(LLAMA2, seed=6)
  hf.save_pretrained(tmp_path / "hf")
  _, params, config = load_llm(tmp_path / "hf")
  source = str(vocab_file) if given == "file" else str(tmp_path / "tok")
  export.export_llm(params, config, tmp_path / "out", tokenizer=source)

  ours = tokenizers_lib.load_tokenizer(str(vocab_file))
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
  text = "what colour is the shape ? red square"
  assert theirs(text, add_special_tokens=False).input_ids == ours.encode(text)
  assert (theirs.bos_token, theirs.eos_token) == ("<s>", "</s>")
  assert (theirs.bos_token_id, theirs.eos_token_id) == (ours.bos_id, ours.eos_id) == (1, 2)
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
  assert model.config.eos_token_id == 2 and model.generation_config.eos_token_id == 2
  # the exported weights behind the auto class (its default attention kernel: ~1e-6 apart)
  np.testing.assert_allclose(hf_logits(model.eval(), IDS), hf_logits(hf.eval(), IDS),
                             atol=1e-5, rtol=0)


def test_export_tokenizer_keeps_the_source_configs_and_refuses_byte(tmp_path):
  vocab_file = _word_tokenizer(tmp_path / "tok" / "tokenizer.json")
  own = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
         "eos_token": "</s>", "model_max_length": 77}
  with open(tmp_path / "tok" / "tokenizer_config.json", "w") as f:
    json.dump(own, f)
  written, ids = export.write_tokenizer(str(vocab_file), str(tmp_path), 512)
  assert json.load(open(tmp_path / "tokenizer_config.json")) == own
  assert ids["eos_token_id"] == 2 and str(tmp_path / "generation_config.json") in written
  with pytest.raises(ValueError, match="byte tokenizer"):
    export.write_tokenizer("byte", str(tmp_path), 512)
