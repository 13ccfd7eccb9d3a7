"""HF transformers Pix2Struct vision encoder → `models.vision.pix2struct`.

Accepts `Pix2StructForConditionalGeneration` folders (e.g. `google/pix2struct-large`: the
encoder under `encoder.`, the text decoder under `decoder.`, which is skipped) and
`Pix2StructVisionModel` folders (no prefix). The architecture is read from the tensor
shapes (`config_from_shapes`); what shapes do not determine (heads, norm eps, activation)
comes from `config.json` (`vision_config` of a full config, or the top-level fields of a
vision config; fields a transformers 4.x/5.x diff-dict left out take
`Pix2StructVisionConfig`'s defaults) or, without a config, from keywords whose defaults
are pix2struct-large's.

    [encoder.]embeddings.patch_projection.{weight,bias}  → patch_projection/{kernel,bias}
    [encoder.]embeddings.row_embedder.weight             → row_embedder/embedding
    [encoder.]embeddings.column_embedder.weight          → column_embedder/embedding
    [encoder.]encoder.layer.{i}.attention.{query,key,value,output}.weight
                                             → layers/attention/*/kernel   (stacked on i)
    [encoder.]encoder.layer.{i}.mlp.{wi_0,wi_1,wo}.weight → layers/mlp/*/kernel
    [encoder.]encoder.layer.{i}.pre_{attention,mlp}_layer_norm.weight
                                             → layers/pre_*_layer_norm/scale
    [encoder.]layernorm.weight                           → layernorm/scale
    decoder.*                                            → skipped (text decoder)

Inside an EAGLE release the same keys sit under
`model.vision_tower.vision_tower.vision_towers.{i}.vision_tower.` (EAGLE's
`Pix2StructLargeVisionTower.vision_tower` is the `Pix2StructVisionModel`, i.e.
`whole_model.encoder`); `config_from_shapes` and `pix2struct_rules` work on those keys
with that prefix removed / prepended (`mapping.prefixed`).
"""

import math
import os
import re
from typing import Any, Mapping

import jax.numpy as jnp

from leo_mini_jax.models.vision import pix2struct as p2s_lib
from leo_mini_jax.porting import expert_port
from leo_mini_jax.porting import mapping
from leo_mini_jax.porting import readers

# transformers' Pix2StructVisionConfig defaults, for config.json files that omit a field.
HF_VISION_DEFAULTS = {
    "hidden_size": 768, "patch_embed_hidden_size": 768, "d_ff": 2048, "d_kv": 64,
    "num_hidden_layers": 12, "num_attention_heads": 12, "dense_act_fn": "gelu_new",
    "layer_norm_eps": 1e-6, "seq_len": 4096,
}
# What the weights do not determine, with google/pix2struct-large's values.
LARGE_KEYWORDS = dict(num_heads=24, layer_norm_eps=1e-6, dense_act_fn="gelu_new",
                      max_patches=2048)

_PREFIX = r"(?:encoder\.)?"
_LAYER = _PREFIX + r"encoder\.layer\.(?P<layer>\d+)\."
# Keys relative to the vision model root (a full model's `encoder.` removed).
_PATCH = "embeddings.patch_projection.weight"
_ROWS = "embeddings.row_embedder.weight"
_LAYER_RE = re.compile(r"encoder\.layer\.(\d+)\.")


def pix2struct_rules(target_prefix: str = "") -> list[mapping.Rule]:
  """The mapping table from HF Pix2Struct vision keys to `Pix2StructEncoder` params."""
  p = target_prefix
  per_layer = [
      *[(f"attention.{n}.weight", f"attention/{n}/kernel", mapping.LINEAR)
        for n in ("query", "key", "value", "output")],
      *[(f"mlp.{n}.weight", f"mlp/{n}/kernel", mapping.LINEAR) for n in ("wi_0", "wi_1", "wo")],
      *[(f"{n}.weight", f"{n}/scale", mapping.IDENTITY)
        for n in ("pre_attention_layer_norm", "pre_mlp_layer_norm")],
  ]
  return [
      mapping.Rule(_PREFIX + r"embeddings\.patch_projection\.weight",
                   p + "patch_projection/kernel", mapping.LINEAR),
      mapping.Rule(_PREFIX + r"embeddings\.patch_projection\.bias", p + "patch_projection/bias"),
      mapping.Rule(_PREFIX + r"embeddings\.row_embedder\.weight", p + "row_embedder/embedding"),
      mapping.Rule(_PREFIX + r"embeddings\.column_embedder\.weight",
                   p + "column_embedder/embedding"),
      *[mapping.Rule(_LAYER + src.replace(".", r"\."), p + "layers/" + dst, transform,
                     stack="layer")
        for src, dst, transform in per_layer],
      mapping.Rule(_PREFIX + r"layernorm\.weight", p + "layernorm/scale"),
      # The text decoder of a Pix2StructForConditionalGeneration.
      mapping.ignore(r"decoder\..*"),
  ]


def _vision_root(shapes: Mapping[str, Any]) -> str:
  """'' for a vision model's keys, 'encoder.' for a full model's."""
  for prefix in ("", "encoder."):
    if prefix + _PATCH in shapes:
      return prefix
  raise ValueError(f"no {_PATCH} (or encoder.{_PATCH}): not a Pix2Struct vision encoder")


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]], *, num_heads: int = 24,
                       **keywords: Any) -> p2s_lib.Pix2StructConfig:
  """`Pix2StructConfig` with the architecture read off tensor shapes.

  Args:
    shapes: key → shape, keys relative to the vision model root (a full model's keys
      with `encoder.` are accepted too).
    num_heads: attention heads (the weights fix only num_heads · head_dim); 24 for large.
    **keywords: other config fields: layer_norm_eps, dense_act_fn, max_patches (defaults:
      pix2struct-large's), image_size, mean, std, dtype, param_dtype, remat, attention_impl.

  The weights determine hidden_size, patch_size (patch_projection's 3·p² inputs),
  seq_len (rows of the position tables), num_layers, mlp_dim and head_dim.
  """
  root = _vision_root(shapes)
  shape = lambda key: tuple(shapes[root + key]) if root + key in shapes else None
  if len(shape(_PATCH)) != 2:
    raise ValueError(f"{root}{_PATCH} has shape {shape(_PATCH)}, not a Linear (out, in) weight")
  hidden, patch_dim = shape(_PATCH)
  side = math.isqrt(patch_dim // 3)
  if 3 * side * side != patch_dim:
    raise ValueError(f"{root}{_PATCH} has {patch_dim} inputs, not 3·p² for a square patch")
  layers = {int(m.group(1)) for key in shapes if key.startswith(root)
            for m in [_LAYER_RE.match(key[len(root):])] if m}
  if not layers:
    raise ValueError(f"no {root}encoder.layer.*: not a Pix2Struct vision encoder")
  if sorted(layers) != list(range(len(layers))):
    raise ValueError(f"{root}encoder.layer.*: layer indices {sorted(layers)} are not 0..n-1")
  first = root + "encoder.layer.0."
  for key in ("attention.query.weight", "mlp.wi_0.weight"):
    if first + key not in shapes:
      raise ValueError(f"no {first}{key}: not a Pix2Struct vision encoder")
  inner = shapes[first + "attention.query.weight"][0]
  if inner % num_heads:
    raise ValueError(f"{first}attention.query.weight has {inner} outputs, not divisible by "
                     f"num_heads={num_heads}")
  rows = shape(_ROWS)
  if rows is None:
    raise ValueError(f"no {root}{_ROWS}: not a Pix2Struct vision encoder")
  values = dict(LARGE_KEYWORDS)
  values.update(
      hidden_size=hidden, patch_size=side, seq_len=rows[0], num_layers=len(layers),
      num_heads=num_heads, head_dim=inner // num_heads,
      mlp_dim=shapes[first + "mlp.wi_0.weight"][0])
  values.update(keywords)
  return p2s_lib.Pix2StructConfig(**values)



def hf_vision_config(path_or_dict: Any) -> tuple[dict[str, Any], str]:
  """(the vision config's fields with HF defaults filled in, where they came from).

  Accepts a folder, a config.json path or a parsed dict: a `pix2struct` config (its
  `vision_config`) or a `pix2struct_vision_model` config.
  """
  hf, where, _ = readers.hf_config(path_or_dict, "Pix2Struct")
  model_type = hf.get("model_type", "pix2struct_vision_model")
  if model_type == "pix2struct" or "vision_config" in hf:
    hf = dict(hf.get("vision_config") or {})
    model_type = hf.get("model_type", "pix2struct_vision_model")
  if model_type != "pix2struct_vision_model":
    raise ValueError(f"{where}: model_type {model_type!r} is not a Pix2Struct (vision) model")
  return {key: hf.get(key, default) for key, default in HF_VISION_DEFAULTS.items()}, where


def config_from_checkpoint(reader, path: str | None = None, **overrides: Any
                           ) -> p2s_lib.Pix2StructConfig:
  """Shapes from `reader`, heads / eps / activation from `path`'s config.json when present.

  A config.json that disagrees with the weights is an error naming the field.
  """
  shapes = {key: tuple(reader.shape(key)) for key in reader.keys()}
  folder = path if path and os.path.isdir(path) else (os.path.dirname(path) if path else None)
  keywords: dict[str, Any] = {}
  hf, where = None, None
  if folder and os.path.exists(os.path.join(folder, "config.json")):
    hf, where = hf_vision_config(folder)
    keywords.update(num_heads=int(hf["num_attention_heads"]),
                    layer_norm_eps=float(hf["layer_norm_eps"]),
                    dense_act_fn=str(hf["dense_act_fn"]))
  keywords.update(overrides)
  try:
    config = config_from_shapes(shapes, **keywords)
  except ValueError as e:
    raise ValueError(f"{reader!r}: {e}") from None
  if hf is not None:
    derived = {"hidden_size": config.hidden_size, "d_ff": config.mlp_dim,
               "d_kv": config.head_dim, "num_hidden_layers": config.num_layers,
               "seq_len": config.seq_len, "patch_embed_hidden_size": config.patch_dim}
    wrong = [f"{k}={hf[k]} (weights: {v})" for k, v in derived.items() if int(hf[k]) != v]
    if wrong:
      raise ValueError(f"{where} disagrees with the weights in {reader!r}: {', '.join(wrong)}")
  return config


def _load(path: str | os.PathLike, module_cls, image_size: int, max_patches: int, dtype: str,
          param_dtype: str, shardings, overrides):
  path = os.fspath(path)
  with readers.open_checkpoint(path) as reader:
    config = config_from_checkpoint(reader, path, image_size=image_size, max_patches=max_patches,
                                    dtype=dtype, param_dtype=param_dtype, **overrides)
    tower = p2s_lib.Pix2StructTower(config)
    pixels = jnp.zeros((1, config.input_size, config.input_size, 3), jnp.float32)
    params = mapping.convert(reader, pix2struct_rules(), mapping.abstract_params(tower, pixels),
                             shardings=shardings)
  return module_cls(config), params


def load_pix2struct(path: str | os.PathLike, image_size: int = 1024, max_patches: int = 2048,
                    dtype: str = "float32", param_dtype: str = "float32", shardings=None,
                    **overrides: Any):
  """Loads an HF Pix2Struct folder (full model or vision only) as the LEO-MINI tower.

  Args:
    path: folder with config.json and model.safetensors / pytorch_model.bin (or a file;
      without config.json heads/eps/activation take pix2struct-large's values or
      `overrides`).
    image_size: the square image the tower receives (EAGLE's 1024² master image).
    max_patches: the processor's patch budget; with image_size it sets the grid by the
      processor's formula (45×45, i.e. a 720-px resize, for 2048).
    dtype / param_dtype: compute dtype and the dtype weights are cast to.
    shardings: optional tree of shardings to place each parameter with.
    **overrides: other Pix2StructConfig fields (num_heads, remat, attention_impl, ...).

  Returns:
    (tower, params): `tower.apply({'params': params}, pixels)` maps [B, S, S, 3] images
    in [0, 1] (S = image_size) to [B, grid_side², hidden_size].
  """
  return _load(path, p2s_lib.Pix2StructTower, image_size, max_patches, dtype, param_dtype,
               shardings, overrides)


def load_encoder(path: str | os.PathLike, image_size: int = 1024, max_patches: int = 2048,
                 dtype: str = "float32", param_dtype: str = "float32", shardings=None,
                 **overrides: Any):
  """As `load_pix2struct`, but returns the HF-interface `Pix2StructEncoder`.

  `encoder.apply({'params': params}, flattened_patches, attention_mask)` returns HF's
  `last_hidden_state`. The params are the same tree the tower uses.
  """
  return _load(path, p2s_lib.Pix2StructEncoder, image_size, max_patches, dtype, param_dtype,
               shardings, overrides)


load_expert = load_pix2struct
# EAGLE's Pix2Struct tower holds HF's Pix2StructVisionModel.
eagle_rules = expert_port.config_free(pix2struct_rules)
RUN_FIELDS = expert_port.run_fields(p2s_lib.Pix2StructConfig, "image_size", "max_patches")


def open_source(path: str, cfg: p2s_lib.Pix2StructConfig, overrides: dict):
  """For `porting.convert`: (reader, rules, the config the checkpoint implies)."""
  reader = readers.open_checkpoint(path)
  keywords = dict(overrides)
  if not os.path.exists(os.path.join(path if os.path.isdir(path) else os.path.dirname(path),
                                     "config.json")):
    # Without a config.json the heads / eps / activation are the run config's.
    keywords.update(num_heads=cfg.num_heads, layer_norm_eps=cfg.layer_norm_eps,
                    dense_act_fn=cfg.dense_act_fn)
  return reader, pix2struct_rules(), config_from_checkpoint(reader, path, **keywords)
