"""Tests for leo_mini_jax/porting/mapping.py: rules, transforms, stacking, error reports."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from leo_mini_jax.porting import mapping as M
from leo_mini_jax.porting import readers


class Block(nn.Module):
  """One residual block: LayerNorm + Dense, logical axes as the project uses them."""

  @nn.compact
  def __call__(self, x, _):
    y = nn.LayerNorm(name="norm", scale_init=nn.with_logical_partitioning(
        nn.initializers.ones, ("norm",)))(x)
    y = nn.Dense(6, name="fc", kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("embed", "mlp")))(y)
    return x + y, None


class Toy(nn.Module):
  """Conv stem, depthwise conv, 3 scanned blocks, a head with a fresh (new) sub-module."""
  scan: bool = True

  @nn.compact
  def __call__(self, img):
    x = nn.Conv(6, (3, 3), name="stem")(img)
    x = nn.Conv(6, (3, 3), feature_group_count=6, name="dw")(x)
    x = x.mean(axis=(1, 2))
    if self.scan:
      x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=3, metadata_params={nn.PARTITION_NAME: "layers"})(name="blocks")(x, None)
    else:
      for i in range(3):
        x, _ = Block(name=f"blocks_{i}")(x, None)
    return x, nn.Dense(2, name="new_head")(x)  # (features, head output)


IMG = jnp.zeros((1, 5, 5, 3))


def _torch_layout_state(seed=0):
  """A PyTorch-style state dict for Toy (OIHW convs, (out,in) linears, LayerNorm weight/bias)."""
  rng = np.random.default_rng(seed)
  r = lambda *s: rng.standard_normal(s).astype(np.float32)
  state = {"stem.weight": r(6, 3, 3, 3), "stem.bias": r(6),
           "dw.weight": r(6, 1, 3, 3), "dw.bias": r(6)}
  for i in range(3):
    state[f"blocks.{i}.norm.weight"] = r(6)
    state[f"blocks.{i}.norm.bias"] = r(6)
    state[f"blocks.{i}.fc.weight"] = r(6, 6)
    state[f"blocks.{i}.fc.bias"] = r(6)
  state["blocks.0.attn.rotary.inv_freq"] = r(3)  # a buffer to ignore
  return state


def _rules(scan=True):
  blk = "blocks/" if scan else "blocks_{layer}/"
  stack = "layer" if scan else ()
  L = r"blocks\.(?P<layer>\d+)\."
  return [
      M.Rule(r"stem\.weight", "stem/kernel", M.CONV),
      M.Rule(r"stem\.bias", "stem/bias"),
      M.Rule(r"dw\.weight", "dw/kernel", M.DEPTHWISE_CONV),
      M.Rule(r"dw\.bias", "dw/bias"),
      M.Rule(L + r"norm\.weight", blk + "norm/scale", stack=stack),
      M.Rule(L + r"norm\.bias", blk + "norm/bias", stack=stack),
      M.Rule(L + r"fc\.weight", blk + "fc/kernel", M.LINEAR, stack=stack),
      M.Rule(L + r"fc\.bias", blk + "fc/bias", stack=stack),
      M.ignore(r".*\.rotary\.inv_freq"),
  ]


def _save(tmp_path, state, name="model.safetensors"):
  save_file(state, str(tmp_path / name))
  return readers.open_checkpoint(tmp_path / name)


def _torch_reference(state, img):
  """Toy's forward (without the head) computed with torch modules from the torch-layout state."""
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  t = {k: torch.from_numpy(v) for k, v in state.items()}
  x = torch.from_numpy(np.asarray(img)).permute(0, 3, 1, 2)
  x = F.conv2d(x, t["stem.weight"], t["stem.bias"], padding=1)
  x = F.conv2d(x, t["dw.weight"], t["dw.bias"], padding=1, groups=6)
  x = x.mean(dim=(2, 3))
  for i in range(3):
    y = F.layer_norm(x, (6,), t[f"blocks.{i}.norm.weight"], t[f"blocks.{i}.norm.bias"], eps=1e-6)
    x = x + F.linear(y, t[f"blocks.{i}.fc.weight"], t[f"blocks.{i}.fc.bias"])
  return x.numpy()


@pytest.mark.parametrize("scan", [True, False])
def test_convert_matches_torch_forward(tmp_path, scan):
  state = _torch_layout_state()
  model = Toy(scan=scan)
  expected = M.abstract_params(model, IMG)
  fresh = nn.meta.unbox(model.init(jax.random.key(1), IMG)["params"])
  params = M.convert(_save(tmp_path, state), _rules(scan), expected,
                     allow_missing=r"new_head/.*", fill=fresh)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == jax.tree.map(
      lambda a: (a.shape, a.dtype), expected)
  np.testing.assert_array_equal(params["new_head"]["kernel"], fresh["new_head"]["kernel"])
  # Features before the head must match torch's computation on the same weights.
  img = np.random.default_rng(3).standard_normal((2, 5, 5, 3)).astype(np.float32)
  x, _ = model.apply({"params": params}, img)
  np.testing.assert_allclose(np.asarray(x), _torch_reference(state, img), atol=1e-5, rtol=1e-5)


def test_stacking_puts_layer_i_at_index_i(tmp_path):
  state = _torch_layout_state()
  params = M.convert(_save(tmp_path, state), _rules(), M.abstract_params(Toy(), IMG),
                     allow_missing=r"new_head/.*",
                     fill=M.init_filler(lambda: Toy().init(jax.random.key(0), IMG)["params"]))
  for i in range(3):
    np.testing.assert_array_equal(params["blocks"]["fc"]["kernel"][i], state[f"blocks.{i}.fc.weight"].T)
    np.testing.assert_array_equal(params["blocks"]["norm"]["scale"][i], state[f"blocks.{i}.norm.weight"])
  np.testing.assert_array_equal(params["stem"]["kernel"], state["stem.weight"].transpose(2, 3, 1, 0))


def test_all_problems_reported_together_and_nothing_returned(tmp_path):
  state = _torch_layout_state()
  state["blocks.1.fc.wieght"] = state.pop("blocks.1.fc.weight")  # renamed
  del state["blocks.2.norm.bias"]  # missing
  del state["dw.bias"]  # missing
  state["stem.weight"] = state["stem.weight"][:5]  # shape mismatch
  state["blocks.3.fc.bias"] = np.zeros(6, np.float32)  # a layer the model lacks
  with pytest.raises(M.PortError) as info:
    M.convert(_save(tmp_path, state), _rules(), M.abstract_params(Toy(), IMG))
  err = info.value
  msg = str(err)
  for needle in ("blocks.1.fc.wieght", "blocks/fc/kernel[layer=1]", "blocks.1.fc.weight",
                 "blocks/norm/bias[layer=2]", "blocks.2.norm.bias", "dw/bias", "stem/kernel",
                 "blocks.3.fc.bias", "new_head/kernel", "new_head/bias"):
    assert needle in msg, needle
  assert len(err.unexpected) == 2 and len(err.mismatched) == 1
  assert len(err.missing) == 5  # fc kernel layer 1, norm bias layer 2, dw bias, head kernel+bias
  # stem/kernel had the wrong shape: reported as a mismatch, not also as missing
  assert not any(m.startswith("stem/kernel") for m in err.missing)


def test_allow_missing_only_covers_what_it_names(tmp_path):
  state = _torch_layout_state()
  del state["dw.bias"]
  with pytest.raises(M.PortError, match="dw/bias") as info:
    M.convert(_save(tmp_path, state), _rules(), M.abstract_params(Toy(), IMG),
              allow_missing=r"new_head/.*", fill=Toy().init(jax.random.key(0), IMG)["params"])
  assert "new_head" not in str(info.value)
  with pytest.raises(ValueError, match="no `fill`"):
    M.convert(_save(tmp_path, _torch_layout_state(), "b.safetensors"), _rules(),
              M.abstract_params(Toy(), IMG), allow_missing=r"new_head/.*")


def test_partially_missing_stack_is_filled_slot_by_slot(tmp_path):
  state = _torch_layout_state()
  del state["blocks.1.fc.weight"]
  fresh = nn.meta.unbox(Toy().init(jax.random.key(2), IMG)["params"])
  params = M.convert(_save(tmp_path, state), _rules(), M.abstract_params(Toy(), IMG),
                     allow_missing=r"new_head/.*|blocks/fc/kernel", fill=fresh)
  k = np.asarray(params["blocks"]["fc"]["kernel"])
  np.testing.assert_array_equal(k[1], fresh["blocks"]["fc"]["kernel"][1])
  np.testing.assert_array_equal(k[0], state["blocks.0.fc.weight"].T)
  np.testing.assert_array_equal(k[2], state["blocks.2.fc.weight"].T)


def test_casts_to_param_dtype_and_reads_bf16(tmp_path):
  state = {k: v.astype(ml_dtypes.bfloat16) for k, v in _torch_layout_state().items()}
  expected = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32),
                          M.abstract_params(Toy(), IMG))
  params = M.convert(_save(tmp_path, state), _rules(), expected,
                     allow_missing="new_head/.*", fill=Toy().init(jax.random.key(0), IMG)["params"])
  assert params["blocks"]["fc"]["kernel"].dtype == jnp.float32
  np.testing.assert_array_equal(params["stem"]["bias"], state["stem.bias"].astype(np.float32))
  expected16 = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16), expected)
  params16 = M.convert(_save(tmp_path, state), _rules(), expected16, allow_missing="new_head/.*",
                       fill=Toy().init(jax.random.key(0), IMG)["params"], to_device=False)
  assert params16["blocks"]["fc"]["kernel"].dtype == ml_dtypes.bfloat16
  assert params16["dw"]["kernel"].tobytes() == state["dw.weight"].transpose(2, 3, 1, 0).tobytes()


def test_split_transform_for_a_fused_projection(tmp_path):
  class Fused(nn.Module):
    @nn.compact
    def __call__(self, x):
      return [nn.Dense(4, name=n)(x) for n in ("q", "k", "v")]

  x = jnp.zeros((1, 3))
  qkv = np.random.default_rng(0).standard_normal((12, 3)).astype(np.float32)
  rules = [M.Rule(r"in_proj_weight", ("q/kernel", "k/kernel", "v/kernel"), M.split(3, 0, M.LINEAR)),
           M.Rule(r"in_proj_bias", ("q/bias", "k/bias", "v/bias"), M.split(3))]
  params = M.convert(_save(tmp_path, {"in_proj_weight": qkv, "in_proj_bias": qkv[:, 0].copy()}),
                     rules, M.abstract_params(Fused(), x))
  np.testing.assert_array_equal(params["k"]["kernel"], qkv[4:8].T)
  np.testing.assert_array_equal(params["v"]["bias"], qkv[8:, 0])


def test_transform_shape_rules():
  assert M.LINEAR.out_shape((3, 5)) == (5, 3)
  assert M.CONV.out_shape((8, 4, 3, 2)) == (3, 2, 4, 8)
  assert M.reshape(2, -1).out_shape((3, 4)) == (2, 6)
  with pytest.raises(ValueError):
    M.LINEAR.out_shape((3,))
  with pytest.raises(ValueError):
    M.reshape(5, -1).out_shape((3, 4))
  t = M.chain(M.reshape(4, 3), M.LINEAR)
  x = np.arange(12.0)
  np.testing.assert_array_equal(t(x), x.reshape(4, 3).T)
  assert t.out_shape((12,)) == (3, 4)


def test_omit_leaves_allowed_missing_out(tmp_path):
  params = M.convert(_save(tmp_path, _torch_layout_state()), _rules(),
                     M.abstract_params(Toy(), IMG), allow_missing=r"new_head/.*", fill=M.OMIT)
  assert "new_head" not in params and "blocks" in params
  state = _torch_layout_state()
  del state["blocks.1.fc.weight"]
  with pytest.raises(ValueError, match="only partly"):
    M.convert(_save(tmp_path, state, "b.safetensors"), _rules(), M.abstract_params(Toy(), IMG),
              allow_missing=r"new_head/.*|blocks/fc/kernel", fill=M.OMIT)


def test_combined_reader_and_prefixed_rules(tmp_path):
  """Two checkpoints into one tree: all problems from both are reported together."""
  class Two(nn.Module):
    @nn.compact
    def __call__(self, img):
      a, _ = Toy(name="a")(img)
      b, _ = Toy(name="b", scan=False)(img)
      return a + b

  state = _torch_layout_state()
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  reader = readers.CombinedReader({"first": _save(tmp_path / "a", state),
                                   "second": _save(tmp_path / "b", _torch_layout_state(1))})
  assert "first:stem.weight" in reader and reader.shape("second:dw.weight") == (6, 1, 3, 3)
  rules = (M.prefixed(_rules(), "first:", "a/") + M.prefixed(_rules(False), "second:", "b/"))
  expected = M.abstract_params(Two(), IMG)
  params = M.convert(reader, rules, expected, allow_missing=r".*/new_head/.*", fill=M.OMIT)
  np.testing.assert_array_equal(params["a"]["blocks"]["fc"]["kernel"][2],
                                state["blocks.2.fc.weight"].T)
  np.testing.assert_array_equal(params["b"]["blocks_2"]["fc"]["bias"],
                                _torch_layout_state(1)["blocks.2.fc.bias"])
  del state["dw.bias"]
  (tmp_path / "c").mkdir()
  bad = readers.CombinedReader({"first": _save(tmp_path / "c", state),
                                "second": _save(tmp_path / "b", {"extra": np.zeros(1, np.float32),
                                                                  **_torch_layout_state(1)})})
  with pytest.raises(M.PortError) as info:
    M.convert(bad, rules, expected, allow_missing=r".*/new_head/.*", fill=M.OMIT)
  assert "a/dw/bias (expected from first:dw.bias)" in str(info.value)
  assert "second:extra" in str(info.value)
  # a rule with a top-level alternation keeps its meaning under a prefix
  alt = M.prefixed([M.Rule(r"x|y", "t")], "p:", "q/")[0]
  assert alt.match("p:y") and not alt.match("y")


def test_streaming_reads_each_tensor_once_in_reader_order(tmp_path):
  """Conversion holds one source tensor at a time: each is read once, file by file."""
  state = _torch_layout_state()
  (tmp_path / "s").mkdir()
  keys = sorted(state)
  save_file({k: state[k] for k in keys[:7]}, str(tmp_path / "s" / "part1.safetensors"))
  save_file({k: state[k] for k in keys[7:]}, str(tmp_path / "s" / "part2.safetensors"))
  reader = readers.open_checkpoint(tmp_path / "s")
  assert len(reader.files) == 2
  reads = []
  original_get = reader.get
  reader.get = lambda key: reads.append(key) or original_get(key)
  M.convert(reader, _rules(), M.abstract_params(Toy(), IMG), allow_missing="new_head/.*",
            fill=M.OMIT)
  used = [k for k in reader.keys() if "inv_freq" not in k]
  assert reads == used  # once each, in the reader's (file-grouped) order; ignored keys unread


_MEMORY_SCRIPT = r"""
import re, sys
import numpy as np
from leo_mini_jax.porting import mapping as M, readers
import jax
L, N, K = 4, 1024, 2048
expected = {f"w{j}": jax.ShapeDtypeStruct((L, N, K), np.float32) for j in range(3)}
rules = [M.Rule(r"l\.(?P<layer>\d+)\.w" + str(j), f"w{j}", M.LINEAR, stack="layer")
         for j in range(3)]
reader = readers.open_checkpoint(sys.argv[1])
# /proc's VmHWM belongs to this process image (ru_maxrss can carry the parent's peak over
# fork + exec).
status = lambda field: int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1))
base = status("VmRSS")
params = M.convert(reader, rules, expected, to_device=False)
growth = (status("VmHWM") - base) * 1024
print(growth / sum(x.nbytes for x in params.values()))
"""


def test_peak_host_memory_stays_near_one_copy(tmp_path):
  """Converting ~100 MB holds about one copy: no file mappings or shards kept resident."""
  if not os.path.exists("/proc/self/status"):
    pytest.skip("needs Linux /proc")
  import subprocess
  import sys
  rng = np.random.default_rng(0)
  for shard in range(2):
    save_file({f"l.{i}.w{j}": rng.standard_normal((2048, 1024), dtype=np.float32)
               for i in range(shard * 2, shard * 2 + 2) for j in range(3)},
              str(tmp_path / f"part{shard}.safetensors"))
  repo = __file__.rsplit("/tests/", 1)[0]
  out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(tmp_path)], cwd=repo,
                       capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": repo, "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
  assert out.returncode == 0, out.stderr[-2000:]
  ratio = float(out.stdout.strip().splitlines()[-1])
  assert ratio < 1.35, f"peak host memory grew by {ratio:.2f}x the converted weights"
