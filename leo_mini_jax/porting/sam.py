"""HF transformers SAM image encoder → `models.vision.sam.SamVisionTower`.

Reads `SamModel` folders (e.g. `facebook/sam-vit-large`: the vision part under
`vision_encoder.`, the prompt encoder and mask decoder skipped) and `SamVisionModel`
folders. The architecture comes from `config.json` (`vision_config` of a SamModel, or the
top level of a SamVisionModel; omitted fields take `SamVisionConfig`'s defaults), mean/std
from `preprocessor_config.json` when the folder has one. `config_from_shapes` reads the
architecture off tensor shapes instead, for weights without a config (an EAGLE release).

Keys relative to the encoder (an optional `vision_encoder.` prefix):

    patch_embed.projection.{weight,bias}   → patch_embed/{kernel (OIHW→HWIO), bias}
    pos_embed (1, g, g, D)                 → pos_embed (g·g, D)
    layers.{i}.layer_norm{1,2}.{weight,bias}
                                → layers/blocks_{i % p}/layer_norm{1,2}/{scale,bias}[i // p]
    layers.{i}.attn.qkv.{weight,bias}      → .../attn/{q,k,v}_proj/{kernel,bias}  (split in 3)
    layers.{i}.attn.proj.{weight,bias}     → .../attn/proj/{kernel,bias}
    layers.{i}.attn.rel_pos_{h,w}          → .../attn/rel_pos_{h,w}
    layers.{i}.mlp.lin{1,2}.{weight,bias}  → .../mlp/lin{1,2}/{kernel,bias}
    neck.*                                 → see `sam_rules(neck=...)`

where p is the length of the repeating block pattern (`SamConfig.block_period`, 6 for
ViT-L's global blocks 5, 11, 17, 23): the tower scans over groups of p blocks.

Necks. HF's `neck.{conv1,layer_norm1,conv2,layer_norm2}` feed the 'hf' tower. EAGLE's SAM
expert replaces that neck by a fresh `ShortSamVisionNeck` (`neck.conv1`,
`neck.layer_norm1`) and this port names it `eagle_neck/`: loading a SAM checkpoint into
the 'eagle' tower skips HF's neck and initialises `eagle_neck/` fresh; an EAGLE release
holds the trained short neck under the same `neck.` names.
"""

import logging
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from leo_mini_jax.models.vision import experts
from leo_mini_jax.models.vision import sam as sam_lib
from leo_mini_jax.porting import expert_port
from leo_mini_jax.porting import mapping
from leo_mini_jax.porting import readers

# transformers' SamVisionConfig defaults, for config.json files that omit a field.
HF_VISION_DEFAULTS = {
    "hidden_size": 768, "output_channels": 256, "num_hidden_layers": 12,
    "num_attention_heads": 12, "num_channels": 3, "image_size": 1024, "patch_size": 16,
    "hidden_act": "gelu", "layer_norm_eps": 1e-6, "qkv_bias": True, "mlp_ratio": 4.0,
    "use_abs_pos": True, "use_rel_pos": True, "window_size": 14,
    "global_attn_indexes": [2, 5, 8, 11], "mlp_dim": None,
}
# What `sam_rules` does with the checkpoint's `neck.*` keys.
NECK_SOURCES = ("eagle", "hf", "skip")
# The fresh parameters of the 'eagle' tower when the source is a SAM checkpoint.
# EAGLE's neck, new on top of a SAM checkpoint: the registry's `fresh` regex for SAM.
EAGLE_NECK = experts.expert_spec("sam").fresh

_PREFIX = r"(?:vision_encoder\.)?"
_LAYER = _PREFIX + r"layers\.(?P<layer>\d+)\."
_ENCODER_PREFIX = "vision_encoder."


def _pos_embed_shape(shape):
  if len(shape) != 4 or shape[0] != 1:
    raise ValueError(f"expects a (1, h, w, D) position table, got shape {shape}")
  return (shape[1] * shape[2], shape[3])


# HF's (1, g, g, D) parameter → the tower's (g·g, D), row-major like the token grid.
POS_EMBED = mapping.Transform("(1,h,w,D)->(h*w,D)", lambda x: x.reshape(-1, x.shape[-1]),
                              _pos_embed_shape)


def sam_rules(target_prefix: str = "", neck: str = "eagle",
              config: sam_lib.SamConfig | None = None) -> list[mapping.Rule]:
  """The mapping table from SAM image-encoder keys to `SamVisionTower` params.

  Args:
    target_prefix: prepended to every Flax path.
    neck: what the checkpoint's `neck.*` keys are: 'eagle' (EAGLE's short neck, conv1 +
      layer_norm1, → `eagle_neck/`; an EAGLE release), 'hf' (HF's neck → `neck/`) or
      'skip' (HF's neck, not used: a SAM checkpoint loaded into the 'eagle' tower, whose
      `eagle_neck/` is then left to a fresh init).
    config: the tower's config; only its block pattern (`block_period`) matters here.
      Default: SAM ViT-L's.
  """
  if neck not in NECK_SOURCES:
    raise ValueError(f"sam_rules(neck={neck!r}): expected one of {NECK_SOURCES}")
  p = target_prefix
  period = (config or sam_lib.SamConfig()).block_period
  block = p + "layers/blocks_{block}/"

  def position(groups):
    layer = int(groups["layer"])
    return {"group": layer // period, "block": layer % period}

  def layer_rule(source, target, transform=mapping.IDENTITY):
    targets = (tuple(block + t for t in target) if isinstance(target, tuple)
               else block + target)
    return mapping.Rule(_LAYER + source, targets, transform, stack="group", groups=position)

  qkv = tuple(f"attn/{name}_proj/" for name in ("q", "k", "v"))
  rules = [
      mapping.Rule(_PREFIX + r"patch_embed\.projection\.weight", p + "patch_embed/kernel",
                   mapping.CONV),
      mapping.Rule(_PREFIX + r"patch_embed\.projection\.bias", p + "patch_embed/bias"),
      mapping.Rule(_PREFIX + r"pos_embed", p + "pos_embed", POS_EMBED),
      layer_rule(r"attn\.qkv\.weight", tuple(t + "kernel" for t in qkv),
                 mapping.split(3, axis=0, then=mapping.LINEAR)),
      layer_rule(r"attn\.qkv\.bias", tuple(t + "bias" for t in qkv), mapping.split(3)),
      layer_rule(r"attn\.proj\.weight", "attn/proj/kernel", mapping.LINEAR),
      layer_rule(r"attn\.proj\.bias", "attn/proj/bias"),
      layer_rule(r"attn\.rel_pos_h", "attn/rel_pos_h"),
      layer_rule(r"attn\.rel_pos_w", "attn/rel_pos_w"),
      *[layer_rule(rf"{norm}\.weight", f"{norm}/scale") for norm in ("layer_norm1", "layer_norm2")],
      *[layer_rule(rf"{norm}\.bias", f"{norm}/bias") for norm in ("layer_norm1", "layer_norm2")],
      *[layer_rule(rf"mlp\.{fc}\.weight", f"mlp/{fc}/kernel", mapping.LINEAR)
        for fc in ("lin1", "lin2")],
      *[layer_rule(rf"mlp\.{fc}\.bias", f"mlp/{fc}/bias") for fc in ("lin1", "lin2")],
  ]
  if neck == "skip":
    rules.append(mapping.ignore(_PREFIX + r"neck\..*"))
  else:
    module = "eagle_neck" if neck == "eagle" else "neck"
    convs = ("conv1",) if neck == "eagle" else ("conv1", "conv2")
    norms = ("layer_norm1",) if neck == "eagle" else ("layer_norm1", "layer_norm2")
    rules += [mapping.Rule(_PREFIX + rf"neck\.{c}\.weight", f"{p}{module}/{c}/kernel",
                           mapping.CONV) for c in convs]
    rules += [mapping.Rule(_PREFIX + rf"neck\.{n}\.{kind}", f"{p}{module}/{n}/{dst}")
              for n in norms for kind, dst in (("weight", "scale"), ("bias", "bias"))]
  # The rest of a SamModel: prompt encoder, mask decoder, their shared positional table.
  rules.append(mapping.ignore(r"(?:prompt_encoder|mask_decoder|shared_image_embedding)\..*"))
  return rules


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]], **keywords: Any
                       ) -> sam_lib.SamConfig:
  """`SamConfig` with what the weights determine read off tensor shapes.

  Args:
    shapes: tensor name → shape, keys relative to the encoder (`vision_encoder.` allowed).
    **keywords: other SamConfig fields (layer_norm_eps, neck, pixel_unshuffle, mean, std,
      dtype, ...), and where the weights do not determine them num_heads, window_size and
      global_attn_indexes (no relative tables), image_size (no position table),
      output_channels (no neck); defaults are SAM ViT-L's.

  Raises:
    ValueError naming the tensor that is missing or whose shape disagrees.
  """
  if any(k.startswith(_ENCODER_PREFIX) for k in shapes):
    shapes = {k[len(_ENCODER_PREFIX):]: tuple(v) for k, v in shapes.items()
              if k.startswith(_ENCODER_PREFIX)}
  shapes = {k: tuple(v) for k, v in shapes.items()}

  def shape(name):
    if name not in shapes:
      raise ValueError(f"no tensor {name!r}; not a SAM image encoder")
    return shapes[name]

  dim, channels, patch, _ = shape("patch_embed.projection.weight")
  if channels != 3:
    raise ValueError(f"patch_embed.projection.weight {shape('patch_embed.projection.weight')}: "
                     f"{channels} input channels, RGB (3) expected")
  layers = sorted({int(m.group(1)) for k in shapes
                   if (m := re.fullmatch(r"layers\.(\d+)\.attn\.qkv\.weight", k))})
  if not layers or layers != list(range(len(layers))):
    raise ValueError(f"layers.*.attn.qkv.weight for layers {layers}: expected 0 … L−1")
  values: dict[str, Any] = dict(
      hidden_size=dim, patch_size=patch, num_layers=len(layers),
      mlp_dim=shape("layers.0.mlp.lin1.weight")[0],
      qkv_bias="layers.0.attn.qkv.bias" in shapes,
      use_abs_pos="pos_embed" in shapes,
      use_rel_pos="layers.0.attn.rel_pos_h" in shapes)
  if "neck.conv1.weight" in shapes:
    values["output_channels"] = shape("neck.conv1.weight")[0]
  if values["use_abs_pos"]:
    _, grid_h, grid_w, _ = shape("pos_embed")
    if grid_h != grid_w:
      raise ValueError(f"pos_embed {shape('pos_embed')}: the grid is not square")
    values["image_size"] = grid_h * patch
    if "image_size" in keywords and int(keywords["image_size"]) != values["image_size"]:
      raise ValueError(f"image_size={keywords['image_size']}, but pos_embed "
                       f"{shape('pos_embed')} is for {values['image_size']} px")
  if values["use_rel_pos"]:
    head_dim = shape("layers.0.attn.rel_pos_h")[1]
    values["num_heads"] = dim // head_dim
    grid = int(keywords.get("image_size", values.get("image_size", 1024))) // patch
    sizes = [(shape(f"layers.{i}.attn.rel_pos_h")[0] + 1) // 2 for i in layers]
    # A window as large as the grid computes what global attention computes.
    windows = sorted({s for s in sizes if s != grid})
    if len(windows) > 1:
      raise ValueError(f"layers.*.attn.rel_pos_h give windows {windows}; one window size "
                       "is supported")
    values["global_attn_indexes"] = tuple(i for i, s in zip(layers, sizes) if s == grid)
    values["window_size"] = windows[0] if windows else keywords.get("window_size", 14)
  values.update(keywords)
  return sam_lib.SamConfig(**values)



def config_from_hf(path_or_dict: Any, **overrides: Any) -> sam_lib.SamConfig:
  """`SamConfig` from an HF SamModel / SamVisionModel folder, config.json path or dict.

  `overrides`: other SamConfig fields (neck, pixel_unshuffle, dtype, param_dtype, remat,
  attention_impl, mean, std).
  """
  hf, where, folder = readers.hf_config(path_or_dict, "SAM")
  if "vision_config" in hf:  # SamModel
    hf = dict(hf["vision_config"] or {})
  model_type = hf.get("model_type", "sam_vision_model")
  if model_type not in ("sam_vision_model", "sam"):
    raise ValueError(f"{where}: model_type {model_type!r} is not a SAM vision model")
  get = lambda key: hf.get(key, HF_VISION_DEFAULTS[key])
  for key, expected in (("num_channels", 3), ("hidden_act", "gelu")):
    if get(key) != expected:
      raise ValueError(f"{where}: {key}={get(key)!r} is not supported (expected {expected!r})")

  def square(key):
    value = get(key)
    if isinstance(value, (list, tuple)):
      if len(set(value)) != 1:
        raise ValueError(f"{where}: {key}={value} is not square")
      value = value[0]
    return int(value)

  hidden = int(get("hidden_size"))
  mlp_dim = get("mlp_dim")
  values = dict(
      image_size=square("image_size"), patch_size=square("patch_size"), hidden_size=hidden,
      mlp_dim=int(hidden * float(get("mlp_ratio"))) if mlp_dim is None else int(mlp_dim),
      num_layers=int(get("num_hidden_layers")), num_heads=int(get("num_attention_heads")),
      window_size=int(get("window_size")),
      global_attn_indexes=tuple(int(i) for i in get("global_attn_indexes")),
      qkv_bias=bool(get("qkv_bias")), use_abs_pos=bool(get("use_abs_pos")),
      use_rel_pos=bool(get("use_rel_pos")), layer_norm_eps=float(get("layer_norm_eps")),
      output_channels=int(get("output_channels")))
  values.update(readers.preprocessor_normalisation(folder))
  values.update(overrides)
  try:
    return sam_lib.SamConfig(**values)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None


def _shapes(reader) -> dict[str, tuple[int, ...]]:
  return {k: tuple(reader.shape(k)) for k in reader.keys()}


def load_sam(path: str | os.PathLike, neck: str = "eagle", dtype: str = "float32",
             param_dtype: str = "float32", shardings=None, rng: jax.Array | None = None,
             **overrides: Any):
  """Loads an HF SamModel / SamVisionModel folder.

  Args:
    path: folder with config.json and model.safetensors / pytorch_model.bin.
    neck: 'eagle' (LEO-MINI's expert: HF's neck skipped, `eagle_neck/` initialised fresh
      from `rng`) or 'hf' (HF's neck; `apply` gives HF's last_hidden_state).
    dtype / param_dtype: compute dtype and the dtype weights are cast to.
    shardings: optional tree of shardings to place each parameter with.
    rng: key for the fresh `eagle_neck/` (default `jax.random.key(0)`).
    **overrides: other SamConfig fields (pixel_unshuffle, remat, attention_impl, mean, std).

  Returns:
    (module, params): `module.apply({'params': params}, pixels)` maps normalised NHWC
    pixels [B, S, S, 3] (S = module.config.image_size) to [B, h·w, feature_dim].
  """
  config = config_from_hf(path, neck=neck, dtype=dtype, param_dtype=param_dtype, **overrides)
  module = sam_lib.SamVisionTower(config)
  pixels = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
  rng = jax.random.key(0) if rng is None else rng
  fresh = None
  if neck == "eagle":
    fresh = mapping.init_filler(lambda: module.init(rng, pixels)["params"])
  with readers.open_checkpoint(path) as reader:
    _check_shapes(reader, config, path)
    rules = sam_rules(neck="hf" if neck == "hf" else "skip", config=config)
    params = mapping.convert(reader, rules, mapping.abstract_params(module, pixels),
                             allow_missing=EAGLE_NECK if fresh else None, fill=fresh,
                             shardings=shardings)
  return module, params


def _check_shapes(reader, config: sam_lib.SamConfig, path) -> None:
  """Names every field where config.json and the tensor shapes disagree."""
  try:
    derived = config_from_shapes(_shapes(reader), image_size=config.image_size)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  fields = ("hidden_size", "patch_size", "num_layers", "mlp_dim", "qkv_bias", "use_abs_pos",
            "use_rel_pos", "output_channels")
  if config.use_rel_pos:
    fields += ("num_heads", "global_attn_indexes")
  differ = [f"{f}: config.json {getattr(config, f)!r}, weights {getattr(derived, f)!r}"
            for f in fields if getattr(config, f) != getattr(derived, f)]
  if differ:
    raise ValueError(f"{path}: config.json does not match the weights: " + "; ".join(differ))


load_expert = load_sam


def eagle_rules(cfg: sam_lib.SamConfig) -> list[mapping.Rule]:
  """EAGLE's SAM tower holds SamVisionEncoder with EAGLE's short neck; the scan groups
  follow the config's global-block pattern."""
  return sam_rules(neck="eagle", config=cfg)

# SamConfig fields a checkpoint does not determine (taken from the run's config).
RUN_FIELDS = expert_port.run_fields(sam_lib.SamConfig, "neck", "pixel_unshuffle")


def open_source(path: str, cfg: sam_lib.SamConfig, overrides: dict):
  """For `porting.convert`: (reader, rules, the config the checkpoint implies).

  With the 'eagle' neck the SAM checkpoint has no `eagle_neck/`: the caller's
  allow-missing regex must name `.../eagle_neck/.*` (`EAGLE_NECK`).
  """
  derived = config_from_hf(path, **overrides)
  plain = config_from_hf(path)
  if (tuple(plain.mean), tuple(plain.std)) != (tuple(cfg.mean), tuple(cfg.std)):
    logging.warning("sam: the config normalises with mean %s std %s, the checkpoint's "
                    "preprocessor uses mean %s std %s", cfg.mean, cfg.std, plain.mean, plain.std)
  reader = readers.open_checkpoint(path)
  _check_shapes(reader, derived, path)
  return reader, sam_rules(neck="hf" if derived.neck == "hf" else "skip", config=derived), derived


__all__ = ["sam_rules", "config_from_shapes", "config_from_hf", "load_sam", "load_expert", "eagle_rules",
           "RUN_FIELDS", "open_source", "EAGLE_NECK", "POS_EMBED"]
