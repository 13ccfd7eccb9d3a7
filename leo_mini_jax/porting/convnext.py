"""timm / open_clip ConvNeXt → `models.vision.convnext.ConvNextTower`.

timm checkpoints carry no config, so the architecture is read off the tensor shapes:
dims and depths from the blocks present, the MLP ratio from `mlp.fc1`, the depthwise
kernel size from `conv_dw`, the stem patch size from `stem.0`, and layer scale from
whether `gamma` exists. LayerNorm eps is not stored anywhere: pass `layer_norm_eps`
(1e-5 for `convnext_xxlarge`, timm's default 1e-6 for the smaller sizes).

Keys are timm's (`convnext_xxlarge.clip_laion2b_soup` on the HF hub), or open_clip's with
the `visual.trunk.` prefix (the open_clip head and text tower are skipped):

    stem.0.{weight,bias}                        → stem/conv/{kernel (OIHW→HWIO), bias}
    stem.1.{weight,bias}                        → stem/norm/{scale,bias}
    stages.{s}.downsample.0.{weight,bias}       → stages_{s}/downsample/norm/{scale,bias}
    stages.{s}.downsample.1.{weight,bias}       → stages_{s}/downsample/conv/{kernel,bias}
    stages.{s}.blocks.{b}.conv_dw.{weight,bias} → stages_{s}/blocks/conv_dw/{kernel, bias} [b]
                                                  (depthwise (C,1,k,k) → (k,k,1,C))
    stages.{s}.blocks.{b}.norm.{weight,bias}    → stages_{s}/blocks/norm/{scale,bias}     [b]
    stages.{s}.blocks.{b}.mlp.fc{1,2}.{weight,bias} → stages_{s}/blocks/fc{1,2}/...       [b]
    stages.{s}.blocks.{b}.gamma                 → stages_{s}/blocks/gamma                 [b]
    head.*                                      → skipped (classifier; not in forward_features)

[b]: a stage's blocks run under `nn.scan`, so block b fills index b of one stacked array.

`mlp.fc*` weights are torch Linear (out, in) or, for `conv_mlp=True` variants such as
`convnext_atto`, 1×1 convs (out, in, 1, 1); both become a Dense kernel (in, out). A
`norm_pre` key (head_norm_first variants, whose forward_features ends in a norm) or a
GRN / overlapping stem (ConvNeXt-V2, other stems) is reported as unexpected.
"""

import dataclasses
import functools
import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from leo_mini_jax.models.vision import convnext as convnext_lib
from leo_mini_jax.porting import expert_port
from leo_mini_jax.porting import mapping
from leo_mini_jax.porting import readers

OPEN_CLIP_PREFIX = "visual.trunk."
_PREFIX = r"(?:visual\.trunk\.)?"
_BLOCK = _PREFIX + r"stages\.(?P<stage>\d+)\.blocks\.(?P<block>\d+)\."
_DOWNSAMPLE = _PREFIX + r"stages\.(?P<stage>\d+)\.downsample\."


def _linear_or_1x1_shape(shape):
  if len(shape) == 4 and tuple(shape[2:]) == (1, 1):
    shape = shape[:2]
  if len(shape) != 2:
    raise ValueError(f"expects a Linear (out, in) or 1×1 conv (out, in, 1, 1) weight, "
                     f"got shape {shape}")
  return (shape[1], shape[0])


def _linear_or_1x1(x: np.ndarray) -> np.ndarray:
  return np.transpose(x.reshape(x.shape[:2]), (1, 0))


# torch Linear (out, in) or 1×1 conv (out, in, 1, 1) → Dense kernel (in, out).
LINEAR_OR_1X1 = mapping.Transform("linear or 1x1 conv → (in,out)", _linear_or_1x1,
                                  _linear_or_1x1_shape)


def convnext_rules(open_clip: bool = False, target_prefix: str = "") -> list[mapping.Rule]:
  """The mapping table from timm (or open_clip `visual.trunk.`) keys to ConvNextTower params.

  `open_clip=True` also skips the open_clip head and text tower.
  """
  p = target_prefix
  # Block b of a stage goes to index b of the stage's scanned (stacked) block parameters.
  block, down = p + "stages_{stage}/blocks/", p + "stages_{stage}/downsample/"
  blk = lambda src, dst, transform=mapping.IDENTITY: mapping.Rule(
      _BLOCK + src, block + dst, transform, stack="block")
  rules = [
      mapping.Rule(_PREFIX + r"stem\.0\.weight", p + "stem/conv/kernel", mapping.CONV),
      mapping.Rule(_PREFIX + r"stem\.0\.bias", p + "stem/conv/bias"),
      mapping.Rule(_PREFIX + r"stem\.1\.weight", p + "stem/norm/scale"),
      mapping.Rule(_PREFIX + r"stem\.1\.bias", p + "stem/norm/bias"),
      mapping.Rule(_DOWNSAMPLE + r"0\.weight", down + "norm/scale"),
      mapping.Rule(_DOWNSAMPLE + r"0\.bias", down + "norm/bias"),
      mapping.Rule(_DOWNSAMPLE + r"1\.weight", down + "conv/kernel", mapping.CONV),
      mapping.Rule(_DOWNSAMPLE + r"1\.bias", down + "conv/bias"),
      blk(r"conv_dw\.weight", "conv_dw/kernel", mapping.DEPTHWISE_CONV),
      blk(r"conv_dw\.bias", "conv_dw/bias"),
      blk(r"norm\.weight", "norm/scale"),
      blk(r"norm\.bias", "norm/bias"),
      blk(r"mlp\.fc1\.weight", "fc1/kernel", LINEAR_OR_1X1),
      blk(r"mlp\.fc1\.bias", "fc1/bias"),
      blk(r"mlp\.fc2\.weight", "fc2/kernel", LINEAR_OR_1X1),
      blk(r"mlp\.fc2\.bias", "fc2/bias"),
      blk(r"gamma", "gamma"),
      # The classifier head (timm: head.norm/head.fc; open_clip trunk: head.*).
      mapping.ignore(_PREFIX + r"head\..*"),
  ]
  if open_clip:
    rules += [
        mapping.ignore(r"visual\.head\..*"),   # open_clip's projection head
        # open_clip's text tower (CLIP and CustomTextCLIP layouts) and logit scale/bias.
        mapping.ignore(r"(?:transformer|token_embedding|ln_final|text)\..*"),
        mapping.ignore(r"positional_embedding|text_projection|logit_scale|logit_bias|attn_mask"),
    ]
  return rules


def config_from_checkpoint(reader, **overrides: Any) -> convnext_lib.ConvNextConfig:
  """`ConvNextConfig` with the architecture inferred from tensor shapes.

  `overrides`: image_size, layer_norm_eps, mean, std, dtype, param_dtype, remat.
  """
  keys = reader.keys()
  prefix = OPEN_CLIP_PREFIX if any(k.startswith(OPEN_CLIP_PREFIX + "stem.") for k in keys) else ""
  where = repr(reader)

  def shape(name: str) -> tuple[int, ...]:
    if prefix + name not in keys:
      raise ValueError(f"{where}: no {prefix + name}; not a timm ConvNeXt checkpoint")
    return tuple(reader.shape(prefix + name))

  block_re = re.compile(re.escape(prefix) + r"stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.weight")
  blocks: dict[int, set[int]] = {}
  for key in keys:
    m = block_re.fullmatch(key)
    if m:
      blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
  if not blocks:
    raise ValueError(f"{where}: no {prefix}stages.*.blocks.*.conv_dw.weight; "
                     "not a timm ConvNeXt checkpoint")
  num_stages = max(blocks) + 1
  stages_without_blocks = [s for s in range(num_stages) if s not in blocks]
  if stages_without_blocks:
    raise ValueError(f"{where}: stages {stages_without_blocks} have no blocks")
  depths = tuple(max(blocks[s]) + 1 for s in range(num_stages))
  dims = tuple(shape(f"stages.{s}.blocks.0.conv_dw.weight")[0] for s in range(num_stages))
  ratios = {shape(f"stages.{s}.blocks.0.mlp.fc1.weight")[0] / dims[s] for s in range(num_stages)}
  if len(ratios) != 1:
    raise ValueError(f"{where}: stages have different MLP ratios {sorted(ratios)}")
  stem = shape("stem.0.weight")
  values = dict(
      depths=depths, dims=dims, mlp_ratio=ratios.pop(),
      kernel_size=shape("stages.0.blocks.0.conv_dw.weight")[-1], patch_size=stem[-1],
      ls_init_value=1e-6 if prefix + "stages.0.blocks.0.gamma" in keys else None)
  values.update(overrides)
  return convnext_lib.ConvNextConfig(**values)


def load_convnext(path: str | os.PathLike, image_size: int = 1024,
                  layer_norm_eps: float = 1e-5, dtype: str = "float32",
                  param_dtype: str = "float32", shardings=None, **overrides: Any):
  """Loads a timm / open_clip ConvNeXt checkpoint (file or folder).

  Args:
    path: timm `model.safetensors` / `pytorch_model.bin`, or an open_clip checkpoint.
    image_size: the size the tower will run at (sets output_grid; any size works).
    layer_norm_eps: 1e-5 for convnext_xxlarge (the default), 1e-6 for timm's smaller sizes.
    dtype / param_dtype: compute dtype and the dtype weights are cast to.
    shardings: optional tree of shardings to place each parameter with.
    **overrides: other ConvNextConfig fields (mean, std, remat).

  Returns:
    (module, params): `module.apply({'params': params}, pixels)` maps normalised NHWC
    pixels [B, S, S, 3] to [B, (S/32)², dims[-1]].
  """
  with readers.open_checkpoint(path) as reader:
    config = config_from_checkpoint(reader, image_size=image_size,
                                    layer_norm_eps=layer_norm_eps, dtype=dtype,
                                    param_dtype=param_dtype, **overrides)
    module = convnext_lib.ConvNextTower(config)
    open_clip = any(k.startswith(OPEN_CLIP_PREFIX) for k in reader.keys())
    pixels = jnp.zeros((1, 32 * config.patch_size, 32 * config.patch_size, 3), jnp.float32)
    params = mapping.convert(reader, convnext_rules(open_clip),
                             mapping.abstract_params(module, pixels), shardings=shardings)
  return module, params


load_expert = load_convnext
# EAGLE's ConvNeXt tower holds the timm trunk (no open_clip prefix).
eagle_rules = expert_port.config_free(functools.partial(convnext_rules, open_clip=False))
RUN_FIELDS = expert_port.run_fields(convnext_lib.ConvNextConfig, "image_size",
                                    "layer_norm_eps")


def open_source(path: str, cfg: convnext_lib.ConvNextConfig, overrides: dict):
  """For `porting.convert`: (reader, rules, the config the checkpoint implies)."""
  reader = readers.open_checkpoint(path)
  derived = config_from_checkpoint(reader, **overrides)
  if derived.ls_init_value is not None and cfg.ls_init_value is not None:
    # Only whether layer scale exists is in the checkpoint; its init value is not.
    derived = dataclasses.replace(derived, ls_init_value=cfg.ls_init_value)
  open_clip = any(k.startswith(OPEN_CLIP_PREFIX) for k in reader.keys())
  return reader, convnext_rules(open_clip), derived
