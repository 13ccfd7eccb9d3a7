"""HF transformers CLIP vision tower → `models.vision.clip.ClipVisionTower`.

Accepts `CLIPVisionModel` folders (keys with the `vision_model.` prefix of transformers
4.x or without it, as 5.x writes them), `CLIPVisionModelWithProjection` and full
`CLIPModel` folders (the text tower and projections are skipped). The architecture comes
from `config.json` (top-level fields, or `vision_config` of a CLIPModel; fields that
transformers 4.x left out because they equal the defaults take `CLIPVisionConfig`'s
defaults). mean/std come from `preprocessor_config.json` when the folder has one.

    [vision_model.]embeddings.class_embedding            → class_embedding
    [vision_model.]embeddings.patch_embedding.weight     → patch_embedding/kernel (OIHW→HWIO)
    [vision_model.]embeddings.position_embedding.weight  → position_embedding
    [vision_model.]pre_layrnorm.{weight,bias}            → pre_layernorm/{scale,bias}
    [vision_model.]encoder.layers.{i}.self_attn.{q,k,v,out}_proj.{weight,bias}
                                                  → layers/self_attn/*/{kernel,bias}   [i]
    [vision_model.]encoder.layers.{i}.layer_norm{1,2}.{weight,bias}
                                                  → layers/layer_norm{1,2}/{scale,bias} [i]
    [vision_model.]encoder.layers.{i}.mlp.fc{1,2}.{weight,bias}
                                                  → layers/mlp/fc{1,2}/{kernel,bias}   [i]
    post_layernorm, position_ids, text tower, projections, logit_scale: not used (skipped)

[i]: the encoder layers run under `nn.scan`, so layer i fills index i of one stacked array.
"""

import logging
import os
from typing import Any

import jax.numpy as jnp

from leo_mini_jax.models.vision import clip as clip_lib
from leo_mini_jax.porting import expert_port
from leo_mini_jax.porting import mapping
from leo_mini_jax.porting import readers

# transformers' CLIPVisionConfig defaults, for config.json files that omit a field.
HF_VISION_DEFAULTS = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}

_PREFIX = r"(?:vision_model\.)?"
_LAYER = _PREFIX + r"encoder\.layers\.(?P<layer>\d+)\."



def config_from_hf(path_or_dict: Any, cls_token: str = "keep", image_size: int | None = None,
                   **overrides: Any) -> clip_lib.ClipConfig:
  """`ClipConfig` from an HF CLIP folder, config.json path or config dict.

  Args:
    path_or_dict: folder (config.json, optional preprocessor_config.json), a config.json
      path, or the parsed dict (CLIPVisionConfig fields or a CLIPConfig with vision_config).
    cls_token: 'keep' (HF's forward) or 'drop' (EAGLE's HR-CLIP).
    image_size: size to run at (None: the checkpoint's); the position embeddings stay
      those of the checkpoint's `image_size` and are interpolated.
    **overrides: other ClipConfig fields (dtype, param_dtype, remat, mean, std, ...).
  """
  hf, where, folder = readers.hf_config(path_or_dict, "CLIP")
  if "vision_config" in hf:  # CLIPModel / CLIPVisionModelWithProjection of a full config
    hf = dict(hf["vision_config"] or {})
  model_type = hf.get("model_type", "clip_vision_model")
  if model_type not in ("clip_vision_model", "clip"):
    raise ValueError(f"{where}: model_type {model_type!r} is not a CLIP vision model")
  get = lambda key: hf.get(key, HF_VISION_DEFAULTS[key])
  if int(get("num_channels")) != 3:
    raise ValueError(f"{where}: num_channels={get('num_channels')} is not supported (RGB only)")
  act = get("hidden_act")
  if act not in clip_lib.HIDDEN_ACTS:
    raise ValueError(f"{where}: hidden_act={act!r} is not supported; expected one of "
                     f"{clip_lib.HIDDEN_ACTS}")
  pretrained = int(get("image_size"))
  values = dict(
      image_size=pretrained if image_size is None else int(image_size),
      pretrained_image_size=pretrained,
      patch_size=int(get("patch_size")),
      hidden_size=int(get("hidden_size")),
      intermediate_size=int(get("intermediate_size")),
      num_layers=int(get("num_hidden_layers")),
      num_heads=int(get("num_attention_heads")),
      layer_norm_eps=float(get("layer_norm_eps")),
      hidden_act=act,
      cls_token=cls_token,
  )
  values.update(readers.preprocessor_normalisation(folder))
  values.update(overrides)
  return clip_lib.ClipConfig(**values)


def clip_rules(target_prefix: str = "") -> list[mapping.Rule]:
  """The mapping table from HF CLIP vision keys to `ClipVisionTower` params."""
  p = target_prefix
  per_layer = [
      *[(f"self_attn.{proj}.{kind}", f"self_attn/{proj}/{dst}", transform)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj")
        for kind, dst, transform in (("weight", "kernel", mapping.LINEAR),
                                     ("bias", "bias", mapping.IDENTITY))],
      *[(f"{norm}.{kind}", f"{norm}/{dst}", mapping.IDENTITY)
        for norm in ("layer_norm1", "layer_norm2")
        for kind, dst in (("weight", "scale"), ("bias", "bias"))],
      *[(f"mlp.{fc}.{kind}", f"mlp/{fc}/{dst}", transform)
        for fc in ("fc1", "fc2")
        for kind, dst, transform in (("weight", "kernel", mapping.LINEAR),
                                     ("bias", "bias", mapping.IDENTITY))],
  ]
  return [
      mapping.Rule(_PREFIX + r"embeddings\.class_embedding", p + "class_embedding"),
      mapping.Rule(_PREFIX + r"embeddings\.patch_embedding\.weight",
                   p + "patch_embedding/kernel", mapping.CONV),
      mapping.Rule(_PREFIX + r"embeddings\.position_embedding\.weight",
                   p + "position_embedding"),
      mapping.Rule(_PREFIX + r"pre_layrnorm\.weight", p + "pre_layernorm/scale"),
      mapping.Rule(_PREFIX + r"pre_layrnorm\.bias", p + "pre_layernorm/bias"),
      # Layer i goes to index i of the scanned layers' stacked arrays.
      *[mapping.Rule(_LAYER + src.replace(".", r"\."), p + "layers/" + dst, transform,
                     stack="layer")
        for src, dst, transform in per_layer],
      # Used only on the pooled class token, which the tower does not return.
      mapping.ignore(_PREFIX + r"post_layernorm\.(?:weight|bias)"),
      # A buffer that transformers < 4.31 saved.
      mapping.ignore(_PREFIX + r"embeddings\.position_ids"),
      # The rest of a CLIPModel / CLIPVisionModelWithProjection.
      mapping.ignore(r"text_model\..*"),
      mapping.ignore(r"(?:text|visual)_projection\.weight"),
      mapping.ignore(r"logit_scale"),
  ]


def load_clip(path: str | os.PathLike, cls_token: str = "keep", image_size: int | None = None,
              dtype: str = "float32", param_dtype: str = "float32", shardings=None,
              **overrides: Any):
  """Loads an HF CLIP (vision) folder.

  Args:
    path: folder with config.json and model.safetensors / pytorch_model.bin.
    cls_token: 'keep' (HF's forward) or 'drop' (EAGLE's HR-CLIP, LEO-MINI's default).
    image_size: size to run at; None runs at the checkpoint's `image_size`.
    dtype / param_dtype: compute dtype and the dtype weights are cast to.
    shardings: optional tree of shardings to place each parameter with.
    **overrides: other ClipConfig fields (remat, attention_impl, mean, std).

  Returns:
    (module, params): `module.apply({'params': params}, pixels)` maps normalised NHWC
    pixels [B, S, S, 3] (S = module.config.image_size) to [B, (S/p)², hidden_size].
  """
  config = config_from_hf(path, cls_token=cls_token, image_size=image_size, dtype=dtype,
                          param_dtype=param_dtype, **overrides)
  module = clip_lib.ClipVisionTower(config)
  pixels = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
  with readers.open_checkpoint(path) as reader:
    params = mapping.convert(reader, clip_rules(), mapping.abstract_params(module, pixels),
                             shardings=shardings)
  return module, params


load_expert = load_clip
# EAGLE's CLIP tower holds HF's CLIPVisionModel.
eagle_rules = expert_port.config_free(clip_rules)
RUN_FIELDS = expert_port.run_fields(clip_lib.ClipConfig, "image_size", "cls_token")


def open_source(path: str, cfg: clip_lib.ClipConfig, overrides: dict):
  """For `porting.convert`: (reader, rules, the config the checkpoint implies)."""
  derived = config_from_hf(path, **overrides)
  plain = config_from_hf(path)
  if (tuple(plain.mean), tuple(plain.std)) != (tuple(cfg.mean), tuple(cfg.std)):
    logging.warning("clip: the config normalises with mean %s std %s, the checkpoint's "
                    "preprocessor uses mean %s std %s", cfg.mean, cfg.std, plain.mean, plain.std)
  return readers.open_checkpoint(path), clip_rules(), derived
