"""EVA-02 detection backbone (detectron2 ViTDet checkpoint) → `models.vision.eva02.Eva02Tower`.

Reads EVA-02's `eva02_L_coco_det_sys_o365.pth`: a detectron2 checkpoint `{"model":
state_dict, ...}` loaded with `torch.load(weights_only=True)` (where the file also holds
EMA weights under 'ema_state', those are read, as EAGLE's loader does), whose backbone sits under
`backbone.net.` (the simple feature pyramid `backbone.simfp_*`, the RPN and ROI heads and
everything else outside `backbone.net.` are skipped). A bare state dict of the backbone
(keys without the prefix, as EAGLE's `EVAViT` holds them) is read too.

Keys relative to the backbone root (EAGLE's `EVAViT`), block i = group·k + j for the
scanned layout with a k-block group (see models/vision/eva02.py):

    patch_embed.proj.{weight,bias}        → patch_embed/{kernel (OIHW→HWIO), bias}
    pos_embed (1, P, D)                   → pos_embed (P, D)
    blocks.{i}.norm{1,2}.{weight,bias}    → blocks/block_{j}/norm{1,2}/{scale,bias}     [group]
    blocks.{i}.attn.{q,k,v}_proj.weight   → blocks/block_{j}/attn/{q,k,v}_proj/kernel   [group]
    blocks.{i}.attn.{q,v}_bias            → blocks/block_{j}/attn/{q,v}_bias            [group]
    blocks.{i}.attn.proj.{weight,bias}    → blocks/block_{j}/attn/proj/{kernel,bias}    [group]
    blocks.{i}.mlp.w{1,2,3}.{weight,bias} → blocks/block_{j}/mlp/w{1,2,3}/{kernel,bias} [group]
    blocks.{i}.mlp.ffn_ln.{weight,bias}   → blocks/block_{j}/mlp/ffn_ln/{scale,bias}    [group]
    rope_win / rope_glb / blocks.{i}.attn.rope .freqs_{cos,sin}
                                          → skipped (buffers; recomputed, as EAGLE does)

(`scan_layers=False`: `blocks_{i}/...`, unstacked.) Width, depth, patch size, MLP width and
the position table's pretraining grid (and whether it has a class slot) are read from
tensor shapes; heads, window size, which blocks are windowed and the rotary pretraining
grid are not stored and default to EVA-02-L's values.
"""

import os
import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from leo_mini_jax.models.vision import eva02 as eva02_lib
from leo_mini_jax.porting import expert_port
from leo_mini_jax.porting import mapping
from leo_mini_jax.porting import readers

DETECTRON2_PREFIX = "backbone.net."
# EAGLE's loader takes a checkpoint's 'ema_state' (else 'module') when it has one.
STATE_KEYS = ("ema_state", "module", "model", "state_dict")
_BLOCK = r"blocks\.(?P<layer>\d+)\."


def _drop_batch_axis_shape(shape):
  if len(shape) != 3 or shape[0] != 1:
    raise ValueError(f"expects a position table of shape (1, P, D), got {shape}")
  return tuple(shape[1:])


# pos_embed (1, P, D) → (P, D).
DROP_BATCH_AXIS = mapping.Transform("(1,P,D)->(P,D)", lambda x: x[0], _drop_batch_axis_shape,
                                    lambda x: x[None])


def eva02_rules(target_prefix: str = "",
                config: eva02_lib.Eva02Config | None = None) -> list[mapping.Rule]:
  """The mapping table from EVA-02 backbone keys (relative to its root) to Eva02Tower params.

  The block layout depends on `config` (scan_layers, and the group length k its
  window/global pattern repeats with); None means EVA-02-L's (k = 3).
  """
  config = eva02_lib.Eva02Config() if config is None else config
  p = target_prefix
  if config.scan_layers:
    period = config.block_period
    block = p + "blocks/block_{slot}/"
    position = lambda g: {"group": int(g["layer"]) // period, "slot": int(g["layer"]) % period}
    stacked = dict(stack="group", groups=position)
  else:
    block, stacked = p + "blocks_{layer}/", {}
  per_block = [
      *[(f"{norm}.{kind}", f"{norm}/{dst}", mapping.IDENTITY)
        for norm in ("norm1", "norm2") for kind, dst in (("weight", "scale"), ("bias", "bias"))],
      *[(f"attn.{proj}.weight", f"attn/{proj}/kernel", mapping.LINEAR)
        for proj in ("q_proj", "k_proj", "v_proj")],
      ("attn.q_bias", "attn/q_bias", mapping.IDENTITY),
      ("attn.v_bias", "attn/v_bias", mapping.IDENTITY),
      ("attn.proj.weight", "attn/proj/kernel", mapping.LINEAR),
      ("attn.proj.bias", "attn/proj/bias", mapping.IDENTITY),
      *[(f"mlp.{fc}.{kind}", f"mlp/{fc}/{dst}", transform)
        for fc in ("w1", "w2", "w3")
        for kind, dst, transform in (("weight", "kernel", mapping.LINEAR),
                                     ("bias", "bias", mapping.IDENTITY))],
      ("mlp.ffn_ln.weight", "mlp/ffn_ln/scale", mapping.IDENTITY),
      ("mlp.ffn_ln.bias", "mlp/ffn_ln/bias", mapping.IDENTITY),
  ]
  return [
      mapping.Rule(r"patch_embed\.proj\.weight", p + "patch_embed/kernel", mapping.CONV),
      mapping.Rule(r"patch_embed\.proj\.bias", p + "patch_embed/bias"),
      mapping.Rule(r"pos_embed", p + "pos_embed", DROP_BATCH_AXIS),
      *[mapping.Rule(_BLOCK + src.replace(".", r"\."), block + dst, transform, **stacked)
        for src, dst, transform in per_block],
      # Rotary tables are buffers of the shared and per-block rope modules; the tower
      # computes them (EAGLE also drops them when loading).
      mapping.ignore(r"(?:rope_win|rope_glb|blocks\.\d+\.attn\.rope)\.freqs_(?:cos|sin)"),
  ]


def detectron2_rules(config: eva02_lib.Eva02Config | None = None,
                     target_prefix: str = "") -> list[mapping.Rule]:
  """`eva02_rules` under `backbone.net.`, every key outside `backbone.net.` skipped."""
  return [*mapping.prefixed(eva02_rules(target_prefix, config), DETECTRON2_PREFIX),
          mapping.ignore(r"(?!" + re.escape(DETECTRON2_PREFIX) + r").*")]


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]], *, prefix: str = "",
                       where: str = "checkpoint", image_size: int = 1024, num_heads: int = 16,
                       window_size: int = 16,
                       window_block_indexes: tuple[int, ...] = eva02_lib.EVA02_L_WINDOW_BLOCKS,
                       rope_pretrain_grid: int = 16, **overrides: Any) -> eva02_lib.Eva02Config:
  """`Eva02Config` from the backbone's tensor shapes (keys `prefix` + relative key).

  The weights give hidden_size, patch_size, num_layers, intermediate_size, pretrain_grid
  and pos_cls_token; the keywords (EVA-02-L's values by default) and `overrides` (other
  Eva02Config fields: dtype, param_dtype, remat, mean, std, ...) give the rest.
  """
  def shape(name: str) -> tuple[int, ...]:
    if prefix + name not in shapes:
      raise ValueError(f"{where}: no {prefix + name}; not an EVA-02 (ViTDet) backbone checkpoint")
    return tuple(shapes[prefix + name])

  patch = shape("patch_embed.proj.weight")
  if len(patch) != 4 or patch[2] != patch[3] or patch[1] != 3:
    raise ValueError(f"{where}: {prefix}patch_embed.proj.weight has shape {patch}; expected "
                     "(D, 3, p, p)")
  block_re = re.compile(re.escape(prefix) + r"blocks\.(\d+)\.norm1\.weight")
  layers = sorted(int(m.group(1)) for m in map(block_re.fullmatch, shapes) if m)
  if not layers:
    raise ValueError(f"{where}: no {prefix}blocks.*.norm1.weight; not an EVA-02 backbone")
  if layers != list(range(len(layers))):
    raise ValueError(f"{where}: blocks {sorted(set(range(layers[-1] + 1)) - set(layers))} "
                     "are missing")
  pos = shape("pos_embed")
  if len(pos) != 3 or pos[0] != 1:
    raise ValueError(f"{where}: {prefix}pos_embed has shape {pos}; expected (1, P, D)")
  side = int(round(np.sqrt(pos[1])))
  cls_token = side * side != pos[1]
  if cls_token:
    side = int(round(np.sqrt(pos[1] - 1)))
    if side * side != pos[1] - 1:
      raise ValueError(f"{where}: {prefix}pos_embed has {pos[1]} positions: neither g² nor g²+1")
  values = dict(
      hidden_size=patch[0], patch_size=patch[-1], num_layers=len(layers),
      intermediate_size=shape("blocks.0.mlp.w1.weight")[0], pretrain_grid=side,
      pos_cls_token=cls_token, image_size=image_size, num_heads=num_heads,
      window_size=window_size, window_block_indexes=tuple(window_block_indexes),
      rope_pretrain_grid=rope_pretrain_grid)
  values.update(overrides)
  try:
    return eva02_lib.Eva02Config(**values)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None


def open_checkpoint(path: str | os.PathLike) -> readers.CheckpointReader:
  """A reader of the checkpoint; a torch file's EMA weights ('ema_state') win, as in EAGLE."""
  path = os.fspath(path)
  if os.path.isfile(path) and path.endswith(readers.TORCH_SUFFIXES):
    return readers.TorchReader([path], state_keys=STATE_KEYS)
  return readers.open_checkpoint(path)


def _layout(reader) -> tuple[str, dict[str, tuple[int, ...]]]:
  """(key prefix of the backbone: 'backbone.net.' or '', {key: shape})."""
  keys = reader.keys()
  prefix = DETECTRON2_PREFIX if any(k.startswith(DETECTRON2_PREFIX) for k in keys) else ""
  return prefix, {k: tuple(reader.shape(k)) for k in keys if k.startswith(prefix)}


def _rules_for(prefix: str, config: eva02_lib.Eva02Config) -> list[mapping.Rule]:
  return detectron2_rules(config) if prefix else eva02_rules(config=config)


def load_eva02(path: str | os.PathLike, image_size: int = 1024, num_heads: int = 16,
               window_size: int = 16,
               window_block_indexes: tuple[int, ...] = eva02_lib.EVA02_L_WINDOW_BLOCKS,
               rope_pretrain_grid: int = 16, dtype: str = "float32",
               param_dtype: str = "float32", shardings=None, **overrides: Any):
  """Loads an EVA-02 detection checkpoint (detectron2 `.pth`, or a bare backbone state dict).

  Args:
    path: the `.pth` file (or a folder holding one checkpoint file).
    image_size: size the tower runs at (1024 for EAGLE; the position table is resized).
    num_heads, window_size, window_block_indexes, rope_pretrain_grid: not stored in the
      weights; EVA-02-L's values by default.
    dtype / param_dtype: compute dtype and the dtype weights are cast to.
    shardings: optional tree of shardings to place each parameter with.
    **overrides: other Eva02Config fields (remat, attention_impl, scan_layers, mean, std).

  Returns:
    (module, params): `module.apply({'params': params}, pixels)` maps normalised NHWC
    pixels [B, S, S, 3] (S = image_size) to [B, (S/16)², hidden_size].
  """
  with open_checkpoint(path) as reader:
    prefix, shapes = _layout(reader)
    config = config_from_shapes(
        shapes, prefix=prefix, where=repr(reader), image_size=image_size, num_heads=num_heads,
        window_size=window_size, window_block_indexes=window_block_indexes,
        rope_pretrain_grid=rope_pretrain_grid, dtype=dtype, param_dtype=param_dtype,
        **overrides)
    module = eva02_lib.Eva02Tower(config)
    pixels = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    params = mapping.convert(reader, _rules_for(prefix, config),
                             mapping.abstract_params(module, pixels), shardings=shardings)
  return module, params


load_expert = load_eva02


def eagle_rules(cfg: eva02_lib.Eva02Config) -> list[mapping.Rule]:
  """EAGLE's EVA-02 tower holds the backbone without `backbone.net.`; the block layout
  follows the config's windowed/global pattern."""
  return eva02_rules(config=cfg)

# Eva02Config fields a checkpoint does not determine (taken from the run's config).
RUN_FIELDS = expert_port.run_fields(
    eva02_lib.Eva02Config, "image_size", "num_heads", "window_size", "window_block_indexes",
    "rope_pretrain_grid", "rope_theta", "layer_norm_eps")


def open_source(path: str, cfg: eva02_lib.Eva02Config, overrides: dict):
  """For `porting.convert`: (reader, rules, the config the checkpoint implies)."""
  del cfg  # everything the run decides arrives in `overrides`
  reader = open_checkpoint(path)
  prefix, shapes = _layout(reader)
  derived = config_from_shapes(shapes, prefix=prefix, where=repr(reader), **overrides)
  return reader, _rules_for(prefix, derived), derived
