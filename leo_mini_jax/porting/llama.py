"""HF transformers LLaMA family (Llama-2, Vicuna v1.5, Llama-3) → `models.llama`.

`config.json` is read in both forms transformers writes: 4.x (`rope_theta`,
`rope_scaling` with `rope_type`/`type`) and 5.x (`rope_parameters` holding `rope_theta`
and the scaling fields). Features our decoder does not implement (attention/MLP biases,
rope types other than default and 'llama3', activations other than SiLU) fail by name.

HF keys (with or without the `model.` prefix of `LlamaForCausalLM`) map to our tree:

    model.embed_tokens.weight                     → embed_tokens/embedding
    model.layers.{i}.input_layernorm.weight       → layers/input_norm/scale          [i]
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight → layers/attention/*/kernel (transposed)
    model.layers.{i}.post_attention_layernorm.weight → layers/post_attention_norm/scale
    model.layers.{i}.mlp.{gate,up,down}_proj.weight  → layers/mlp/*/kernel (transposed)
    model.norm.weight                             → final_norm/scale
    lm_head.weight                                → lm_head/kernel (transposed; dropped when tied)

With `scan_layers=True` layer i goes to index i of a stacked array; otherwise to
`layers_{i}/...`. q/k need no permutation: our rotary uses HF's rotate-half layout.
"""

import json
import os
from typing import Any, Mapping

import jax.numpy as jnp

from leo_mini_jax.models import llama as llama_lib
from leo_mini_jax.porting import mapping
from leo_mini_jax.porting import readers

# transformers' LlamaConfig defaults, used where a config.json omits a field.
HF_DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "hidden_act": "silu",
}
SUPPORTED_MODEL_TYPES = ("llama", "mistral")  # mistral shares the layout (no sliding window)

_LAYER = r"(?:model\.)?layers\.(?P<layer>\d+)\."


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
  """The dict in `config.json` of a folder (or the given .json file)."""
  path = os.fspath(path)
  file = os.path.join(path, "config.json") if os.path.isdir(path) else path
  if not os.path.exists(file):
    raise FileNotFoundError(f"no config.json at {file} (an HF LLaMA folder needs one)")
  with open(file) as f:
    try:
      return json.load(f)
    except ValueError as e:
      raise ValueError(f"{file}: not valid JSON ({e})") from None


def _rope(hf: Mapping[str, Any], where: str) -> tuple[float, llama_lib.RopeScaling | None]:
  """(rope_theta, scaling) from either config form."""
  params = hf.get("rope_parameters")
  if params is not None and not isinstance(params, Mapping):
    raise ValueError(f"{where}: rope_parameters must be an object, got {params!r}")
  if params and any(k in params for k in ("rope_theta", "rope_type", "type")):
    theta = params.get("rope_theta", hf.get("rope_theta", HF_DEFAULTS["rope_theta"]))
    scaling = params
  else:  # 4.x form (or a 5.x dict keyed by layer type, which LLaMA does not use)
    if params:
      raise ValueError(f"{where}: per-layer-type rope_parameters {sorted(params)} "
                       "are not supported for LLaMA")
    theta = hf.get("rope_theta", HF_DEFAULTS["rope_theta"])
    scaling = hf.get("rope_scaling")
  if not scaling:
    return float(theta), None
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type == "default":
    return float(theta), None
  if rope_type != "llama3":
    raise ValueError(f"{where}: rope type {rope_type!r} is not supported "
                     "(supported: 'default', 'llama3')")
  fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
  absent = [f for f in fields if f not in scaling]
  if absent:
    raise ValueError(f"{where}: llama3 rope scaling lacks {absent}")
  return float(theta), llama_lib.RopeScaling(
      factor=float(scaling["factor"]),
      low_freq_factor=float(scaling["low_freq_factor"]),
      high_freq_factor=float(scaling["high_freq_factor"]),
      original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))


def config_from_hf(hf: Mapping[str, Any] | str | os.PathLike,
                   **overrides: Any) -> llama_lib.LlamaConfig:
  """`LlamaConfig` from an HF config dict, folder or config.json path.

  `overrides` set our own fields (dtype, param_dtype, scan_layers, remat_policy,
  attention_impl, mmoe, ...).
  """
  where = "config.json"
  if not isinstance(hf, Mapping):
    where = os.fspath(hf)
    hf = read_hf_config(hf)
  get = lambda k: hf.get(k, HF_DEFAULTS.get(k))
  model_type = hf.get("model_type", "llama")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"{where}: model_type {model_type!r} is not a LLaMA-family model")
  if model_type == "mistral" and hf.get("sliding_window") is not None:
    raise ValueError(f"{where}: sliding_window={hf['sliding_window']} is not supported")
  unsupported = [k for k in ("attention_bias", "mlp_bias") if hf.get(k)]
  if unsupported:
    raise ValueError(f"{where}: {', '.join(f'{k}=true' for k in unsupported)} is not "
                     "supported (our LLaMA projections have no bias)")
  if get("hidden_act") != "silu":
    raise ValueError(f"{where}: hidden_act={get('hidden_act')!r} is not supported (only 'silu')")
  theta, scaling = _rope(hf, where)
  heads = int(get("num_attention_heads"))
  kv_heads = hf.get("num_key_value_heads")
  head_dim = hf.get("head_dim")
  hidden = int(get("hidden_size"))
  values = dict(
      vocab_size=int(get("vocab_size")),
      hidden_size=hidden,
      intermediate_size=int(get("intermediate_size")),
      num_layers=int(get("num_hidden_layers")),
      num_heads=heads,
      num_kv_heads=None if kv_heads in (None, heads) else int(kv_heads),
      # HF writes head_dim even when it is the default; keep None then (same shapes).
      head_dim=None if head_dim in (None, hidden // heads) else int(head_dim),
      rope_theta=theta,
      rope_scaling=scaling,
      rms_norm_eps=float(get("rms_norm_eps")),
      tie_embeddings=bool(get("tie_word_embeddings")),
      max_position_embeddings=int(get("max_position_embeddings")),
  )
  values.update(overrides)
  return llama_lib.LlamaConfig(**values)


def llama_rules(config: llama_lib.LlamaConfig, target_prefix: str = "") -> list[mapping.Rule]:
  """The mapping table from HF LLaMA keys to `LlamaForCausalLM` params (under `target_prefix`)."""
  layer = "layers/" if config.scan_layers else "layers_{layer}/"
  stack = "layer" if config.scan_layers else ()
  per_layer = [
      ("input_layernorm.weight", "input_norm/scale", mapping.IDENTITY),
      ("post_attention_layernorm.weight", "post_attention_norm/scale", mapping.IDENTITY),
      *[(f"self_attn.{p}.weight", f"attention/{p}/kernel", mapping.LINEAR)
        for p in ("q_proj", "k_proj", "v_proj", "o_proj")],
      *[(f"mlp.{p}.weight", f"mlp/{p}/kernel", mapping.LINEAR)
        for p in ("gate_proj", "up_proj", "down_proj")],
  ]
  p = target_prefix
  rules = [
      mapping.Rule(r"(?:model\.)?embed_tokens\.weight", p + "embed_tokens/embedding"),
      *[mapping.Rule(_LAYER + src.replace(".", r"\."), p + layer + dst, transform, stack=stack)
        for src, dst, transform in per_layer],
      mapping.Rule(r"(?:model\.)?norm\.weight", p + "final_norm/scale"),
      # Non-persistent rotary buffers that old checkpoints carry.
      mapping.ignore(r"(?:model\.)?(?:layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq"),
  ]
  if config.tie_embeddings:  # some tied checkpoints still store a copy of the embedding
    rules.append(mapping.ignore(r"lm_head\.weight"))
  else:
    rules.append(mapping.Rule(r"lm_head\.weight", p + "lm_head/kernel", mapping.LINEAR))
  return rules


def abstract_llm_params(model: llama_lib.LlamaForCausalLM) -> dict[str, Any]:
  return mapping.abstract_params(model, jnp.zeros((1, 1), jnp.int32))


def load_llm(path: str | os.PathLike, dtype: str = "float32", param_dtype: str = "float32",
             scan_layers: bool = True, shardings=None, **overrides: Any):
  """Loads an HF LLaMA-family folder.

  Args:
    path: folder with config.json and safetensors (single or sharded) or pytorch_model.bin.
    dtype: compute dtype; param_dtype: the dtype weights are cast to while streaming.
    scan_layers: stack layers for `nn.scan` (else `layers_0`, `layers_1`, ...).
    shardings: optional tree of shardings to place each parameter with as it completes.
    **overrides: other `LlamaConfig` fields (remat_policy, attention_impl, ...).

  Returns:
    (model, params, config): `model.apply({'params': params}, input_ids)` gives logits
    [batch, length, vocab].
  """
  config = config_from_hf(path, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers,
                          **overrides)
  model = llama_lib.LlamaForCausalLM(config)
  with readers.open_checkpoint(path) as reader:
    params = mapping.convert(reader, llama_rules(config), abstract_llm_params(model),
                             shardings=shardings)
  return model, params, config
