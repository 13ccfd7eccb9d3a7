"""EVA-02 detection backbone (detectron2 .pth) → Eva02Tower: parity with a torch reference.

No package ships EAGLE's `eva_vit.py`, so `EvaViTReference` below writes its computation
out in torch (same module and parameter names, so its state dict has the checkpoint's
keys): patch embed, `get_abs_pos` (bicubic resize of a class-slot position table),
window partition / unpartition with padding, `VisionRotaryEmbeddingFast` (separate tables
for windowed and global blocks), attention with q/v biases, SwiGLU with its sub-LayerNorm.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.porting.conftest import reference_libraries

torch, = reference_libraries("torch")
nn = torch.nn
F = torch.nn.functional

from leo_mini_jax import porting  # noqa: E402
from leo_mini_jax.models.vision.eva02 import Eva02Config, Eva02Tower  # noqa: E402
from leo_mini_jax.porting import eva02 as eva02_port  # noqa: E402
from leo_mini_jax.porting import mapping  # noqa: E402
from leo_mini_jax.porting.mapping import PortError  # noqa: E402


# ------------------------------------------------------------------ the torch reference

def rotate_half(x):
  x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
  return torch.stack((-x2, x1), dim=-1).flatten(-2)


class RopeFast(nn.Module):
  """EVA's VisionRotaryEmbeddingFast (freqs_for='lang')."""

  def __init__(self, dim, pt_seq_len, ft_seq_len, theta=10000):
    super().__init__()
    freqs = 1. / (theta ** (torch.arange(0, dim, 2)[:(dim // 2)].float() / dim))
    t = torch.arange(ft_seq_len) / ft_seq_len * pt_seq_len
    freqs = torch.einsum("..., f -> ... f", t, freqs).repeat_interleave(2, dim=-1)
    n = ft_seq_len
    freqs = torch.cat([freqs[:, None, :].expand(n, n, -1), freqs[None, :, :].expand(n, n, -1)],
                      dim=-1)
    self.register_buffer("freqs_cos", freqs.cos().view(-1, freqs.shape[-1]))
    self.register_buffer("freqs_sin", freqs.sin().view(-1, freqs.shape[-1]))

  def forward(self, t):
    return t * self.freqs_cos + rotate_half(t) * self.freqs_sin


class SwiGLU(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.w1, self.w2 = nn.Linear(dim, hidden), nn.Linear(dim, hidden)
    self.ffn_ln = nn.LayerNorm(hidden, eps=1e-6)
    self.w3 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class Attention(nn.Module):
  def __init__(self, dim, num_heads, rope):
    super().__init__()
    self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
    self.q_proj = nn.Linear(dim, dim, bias=False)
    self.k_proj = nn.Linear(dim, dim, bias=False)
    self.v_proj = nn.Linear(dim, dim, bias=False)
    self.q_bias, self.v_bias = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))
    self.rope = rope
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    heads = lambda t: t.reshape(b, h * w, self.num_heads, -1).permute(0, 2, 1, 3)
    q = heads(F.linear(x, self.q_proj.weight, self.q_bias))
    k = heads(F.linear(x, self.k_proj.weight))
    v = heads(F.linear(x, self.v_proj.weight, self.v_bias))
    q, k = self.rope(q).type_as(v), self.rope(k).type_as(v)
    attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    x = (attn @ v).transpose(1, 2).reshape(b, h * w, -1)
    return self.proj(x).view(b, h, w, c)


def window_partition(x, ws):
  b, h, w, c = x.shape
  pad_h, pad_w = (ws - h % ws) % ws, (ws - w % ws) % ws
  x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
  hp, wp = h + pad_h, w + pad_w
  x = x.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, ws, ws, c), (hp, wp)


def window_unpartition(windows, ws, pad_hw, hw):
  (hp, wp), (h, w) = pad_hw, hw
  b = windows.shape[0] // (hp * wp // ws // ws)
  x = windows.view(b, hp // ws, wp // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5)
  return x.reshape(b, hp, wp, -1)[:, :h, :w]


class Block(nn.Module):
  def __init__(self, dim, num_heads, hidden, window_size, rope):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, num_heads, rope)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = SwiGLU(dim, hidden)
    self.window_size = window_size

  def forward(self, x):
    shortcut, x = x, self.norm1(x)
    if self.window_size > 0:
      h, w = x.shape[1], x.shape[2]
      x, pad_hw = window_partition(x, self.window_size)
    x = self.attn(x)
    if self.window_size > 0:
      x = window_unpartition(x, self.window_size, pad_hw, (h, w))
    x = shortcut + x
    return x + self.mlp(self.norm2(x))


def get_abs_pos(abs_pos, has_cls_token, hw):
  h, w = hw
  if has_cls_token:
    abs_pos = abs_pos[:, 1:]
  size = int(math.sqrt(abs_pos.shape[1]))
  if size != h or size != w:
    return F.interpolate(abs_pos.reshape(1, size, size, -1).permute(0, 3, 1, 2),
                         size=(h, w), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
  return abs_pos.reshape(1, h, w, -1)


class EvaViTReference(nn.Module):
  """EAGLE's EVAViT (eva02-l-16 arguments: subln=False, xattn=False, no residual blocks)."""

  def __init__(self, img_size=1024, patch_size=16, embed_dim=1024, depth=24, num_heads=16,
               mlp_ratio=4 * 2 / 3, pt_hw_seq_len=16, window_size=16,
               window_block_indexes=tuple(i for i in range(24) if i % 3 != 2),
               pretrain_img_size=224, pretrain_use_cls_token=True):
    super().__init__()
    self.pretrain_use_cls_token = pretrain_use_cls_token
    self.patch_embed = nn.Module()
    self.patch_embed.proj = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)
    num_patches = (pretrain_img_size // patch_size) ** 2
    self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + int(pretrain_use_cls_token),
                                              embed_dim))
    half_head_dim = embed_dim // num_heads // 2
    self.rope_win = RopeFast(half_head_dim, pt_hw_seq_len, window_size)
    self.rope_glb = RopeFast(half_head_dim, pt_hw_seq_len, img_size // patch_size)
    self.blocks = nn.ModuleList([
        Block(embed_dim, num_heads, int(embed_dim * mlp_ratio),
              window_size if i in window_block_indexes else 0,
              self.rope_win if i in window_block_indexes else self.rope_glb)
        for i in range(depth)])

  def forward(self, x):
    x = self.patch_embed.proj(x).permute(0, 2, 3, 1)
    x = x + get_abs_pos(self.pos_embed, self.pretrain_use_cls_token, (x.shape[1], x.shape[2]))
    for blk in self.blocks:
      x = blk(x)
    return x.permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------ helpers

# Grid 6 is not a multiple of window 4 (padding); position table for a 5×5 grid plus a class
# slot; rotary tables made for a 3×3 grid, interpolated to 4 (windows) and 6 (global).
TOY = dict(img_size=96, patch_size=16, embed_dim=64, depth=6, num_heads=4, pt_hw_seq_len=3,
           window_size=4, window_block_indexes=(0, 1, 3, 4), pretrain_img_size=80)
TOY_KW = dict(image_size=96, num_heads=4, window_size=4, window_block_indexes=(0, 1, 3, 4),
              rope_pretrain_grid=3)


def reference(seed=0, **overrides):
  """The torch reference with every parameter random (so a skipped tensor shows)."""
  torch.manual_seed(seed)
  model = EvaViTReference(**{**TOY, **overrides})
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      is_norm = ".norm" in name or ".ffn_ln." in name
      base = 1.0 if is_norm and name.endswith("weight") else 0.0
      p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
  return model.eval()


def save_detectron2(model, path, extra=None):
  """As detectron2 saves: {'model': state dict with the backbone under backbone.net., ...}."""
  state = {f"backbone.net.{k}": v for k, v in model.state_dict().items()}
  d = model.pos_embed.shape[-1]
  state.update({  # the simple feature pyramid and detection heads, which the port skips
      "backbone.simfp_2.0.weight": torch.randn(d, d // 2, 2, 2),
      "backbone.simfp_5.1.norm.weight": torch.randn(d),
      "proposal_generator.rpn_head.conv.weight": torch.randn(d, d, 3, 3),
      "roi_heads.box_predictor.0.cls_score.weight": torch.randn(81, d),
      "pixel_mean": torch.randn(3, 1, 1),
  })
  state.update(extra or {})
  torch.save({"model": state, "iteration": 7, "__author__": "test"}, str(path))


def pixels(size, seed=1):
  return np.random.default_rng(seed).standard_normal((2, size, size, 3)).astype(np.float32)


def reference_tokens(model, x):
  with torch.no_grad():
    out = model(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
  return out.flatten(2).transpose(1, 2).numpy()


# -------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("scan_layers", [True, False])
def test_parity_detectron2_checkpoint(tmp_path, scan_layers):
  model = reference()
  save_detectron2(model, tmp_path / "eva02_det.pth")
  module, params = porting.load_vision_expert("eva02", tmp_path / "eva02_det.pth",
                                              scan_layers=scan_layers, **TOY_KW)
  cfg = module.config
  assert (cfg.hidden_size, cfg.num_layers, cfg.patch_size, cfg.intermediate_size,
          cfg.pretrain_grid, cfg.pos_cls_token) == (64, 6, 16, 170, 5, True)
  assert cfg.output_grid == (6, 6) and cfg.block_period == 3
  if scan_layers:
    assert params["blocks"]["block_2"]["attn"]["q_proj"]["kernel"].shape == (2, 64, 64)
  x = pixels(96)
  out = np.asarray(module.apply({"params": params}, jnp.asarray(x)))
  expected = reference_tokens(model, x)
  assert out.shape == expected.shape == (2, 36, 64)
  np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("windows, pretrain", [((), 96), ((0, 2, 3), 64)])
def test_parity_other_block_patterns(tmp_path, windows, pretrain):
  # All-global blocks with a table already at the input grid (no resize, k = 1); and an
  # irregular pattern (window, global, window, window: one group of 4) from a 4×4 table.
  model = reference(seed=3, depth=4, window_block_indexes=windows, pretrain_img_size=pretrain)
  torch.save(model.state_dict(), str(tmp_path / "backbone.pth"))  # a bare EVAViT state dict
  module, params = eva02_port.load_eva02(tmp_path / "backbone.pth",
                                         **{**TOY_KW, "window_block_indexes": windows})
  assert module.config.block_period == (1 if not windows else 4)
  x = pixels(96, seed=4)
  np.testing.assert_allclose(np.asarray(module.apply({"params": params}, jnp.asarray(x))),
                             reference_tokens(model, x), atol=1e-4, rtol=1e-4)


def test_parity_under_eagle_prefix(tmp_path):
  """The table reused under an EAGLE release's key prefix, as the release converter does."""
  model = reference(seed=5)
  prefix = "model.vision_tower.vision_tower.vision_towers.3.vision_tower."
  state = {prefix + k: v for k, v in model.state_dict().items()}  # rope buffers included
  state["model.mm_projector.0.weight"] = torch.zeros(4, 4)
  torch.save(state, str(tmp_path / "release.bin"))
  with porting.open_checkpoint(tmp_path / "release.bin") as reader:
    shapes = {k[len(prefix):]: reader.shape(k) for k in reader.keys() if k.startswith(prefix)}
    config = eva02_port.config_from_shapes(shapes, **TOY_KW)
    module = Eva02Tower(config)
    rules = mapping.prefixed(eva02_port.eva02_rules("vision/eva02/", config), prefix, "")
    rules.append(mapping.ignore(r"model\.mm_projector\..*"))
    expected = {"vision": {"eva02": mapping.abstract_params(module, jnp.zeros((1, 96, 96, 3)))}}
    params = mapping.convert(reader, rules, expected)["vision"]["eva02"]
  x = pixels(96, seed=6)
  np.testing.assert_allclose(np.asarray(module.apply({"params": params}, jnp.asarray(x))),
                             reference_tokens(model, x), atol=1e-4, rtol=1e-4)


def test_ema_weights_win_and_open_source_matches_the_run_config(tmp_path):
  # EAGLE loads 'ema_state' when a checkpoint has it; 'model' here holds other weights.
  model, other = reference(seed=7), reference(seed=8)
  prefixed = lambda m: {f"backbone.net.{k}": v for k, v in m.state_dict().items()}
  torch.save({"model": prefixed(other), "ema_state": prefixed(model), "iteration": 1},
             str(tmp_path / "eva02_det.pth"))
  run = Eva02Config(**{**TOY_KW, "hidden_size": 64, "num_layers": 6, "intermediate_size": 170,
                       "pretrain_grid": 5, "remat": True})
  reader, rules, derived = eva02_port.open_source(
      str(tmp_path / "eva02_det.pth"), run, {f: getattr(run, f) for f in eva02_port.RUN_FIELDS})
  assert derived == run
  module = Eva02Tower(derived)
  with reader:
    params = mapping.convert(reader, rules,
                             mapping.abstract_params(module, jnp.zeros((1, 96, 96, 3))))
  x = pixels(96, seed=9)
  np.testing.assert_allclose(np.asarray(module.apply({"params": params}, jnp.asarray(x))),
                             reference_tokens(model, x), atol=1e-4, rtol=1e-4)


def test_bad_keys_are_reported_by_name(tmp_path):
  model = reference()
  state = dict(model.state_dict())
  del state["blocks.4.attn.q_bias"]
  state["blocks.1.attn.inner_attn_ln.weight"] = torch.ones(64)   # the subln attention variant
  state["blocks.2.mlp.w3.bias"] = torch.ones(65)
  torch.save({"model": {f"backbone.net.{k}": v for k, v in state.items()}},
             str(tmp_path / "bad.pth"))
  with pytest.raises(PortError) as info:
    eva02_port.load_eva02(tmp_path / "bad.pth", **TOY_KW)
  message = str(info.value)
  assert "blocks/block_1/attn/q_bias[group=1]" in message          # block 4 = group 1, slot 1
  assert "backbone.net.blocks.1.attn.inner_attn_ln.weight" in message
  assert "backbone.net.blocks.2.mlp.w3.bias" in message and "(65,)" in message


def test_not_an_eva02_checkpoint(tmp_path):
  torch.save({"model": {"backbone.bottom_up.stem.conv1.weight": torch.zeros(8, 3, 7, 7)}},
             str(tmp_path / "r50.pth"))
  with pytest.raises(ValueError, match="not an EVA-02"):
    eva02_port.load_eva02(tmp_path / "r50.pth")


def test_window_blocks_outside_the_depth_are_an_error(tmp_path):
  save_detectron2(reference(), tmp_path / "eva02_det.pth")
  with pytest.raises(ValueError, match="window_block_indexes"):
    eva02_port.load_eva02(tmp_path / "eva02_det.pth", image_size=96, num_heads=4)


def count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def test_full_size_parameter_count():
  """EVA-02-L at 1024 px: the Flax tower (abstract) vs the torch reference on `meta`."""
  with torch.device("meta"):
    model = EvaViTReference()
  state = model.state_dict()
  torch_params = {k: tuple(p.shape) for k, p in model.named_parameters()}
  expected = mapping.abstract_params(Eva02Tower(Eva02Config()), jnp.zeros((1, 1024, 1024, 3)))
  # 24 blocks × 12_599_976 + patch embed 787_456 + 197 positions × 1024
  assert count(expected) == sum(math.prod(s) for s in torch_params.values()) == 303_388_608
  # The real key set and shapes fit the default config and plan completely.
  shapes = {f"backbone.net.{k}": tuple(v.shape) for k, v in state.items()}
  config = eva02_port.config_from_shapes(shapes, prefix="backbone.net.")
  assert config == Eva02Config()
  assert config.output_grid == (64, 64) and config.feature_dim == 1024

  class ShapeOnlyReader:
    def keys(self):
      return list(shapes)

    def shape(self, key):
      return shapes[key]

  assignments, allowed = mapping.plan(ShapeOnlyReader(), eva02_port.detectron2_rules(config),
                                      expected)
  assert not allowed and len(assignments) == len(torch_params)
