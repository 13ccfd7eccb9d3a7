"""Compiling for TPU and H100 targets without the hardware (leo_mini_jax.parallel).

The compile tests need requirements-aot.txt's packages and a host kept on the CPU:

  JAX_PLATFORMS=cpu python -m pytest -q tests/parallel/test_targets.py --runslow

and skip, saying why, where the TPU or CUDA compiler cannot be loaded.
"""

import copy
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import tiny
from leo_mini_jax.models import attention
from leo_mini_jax.parallel import aot
from leo_mini_jax.parallel import targets

GIB = 2**30
FMHA = "__cudnn$fmha"


@functools.cache
def _target(platform):
  reason = targets.available(platform)
  if reason:
    pytest.skip(reason + " (needs requirements-aot.txt and JAX_PLATFORMS=cpu)")
  if platform == "gpu":
    return targets.gpu_target("h100", "1x1x2")
  return targets.tpu_target("v5e:2x2")


def tiny_bf16(stage=3):
  """The tiny config in bf16; stage 3's rows are 64 + 4 visual - 1 = 67 tokens (odd)."""
  config = tiny.get_config(f"stage={stage},steps=4")
  config.data.batch_size = 8
  config.model["dtype"] = "bfloat16"
  config.model.llm["dtype"] = "bfloat16"
  for expert in config.model.experts:
    expert["dtype"] = "bfloat16"
  return config


def _custom_calls(text, marker):
  """The op_name metadata of every custom call to `marker` in compiled HLO text."""
  return [line.split('op_name="')[1].split('"')[0] for line in text.splitlines()
          if f'custom_call_target="{marker}' in line]


def _attention_hlo(target, length, dtype=jnp.bfloat16, head_dim=128, **kwargs):
  """Compiled text of d(loss)/d(q, k, v) of 'auto' attention at `length` tokens."""
  mesh = jax.sharding.Mesh(target.devices, ("data",))
  q = jax.ShapeDtypeStruct((2, length, 8, head_dim), dtype,
                           sharding=NamedSharding(mesh, P("data")))
  k = jax.ShapeDtypeStruct((2, length, 2, head_dim), dtype,
                           sharding=NamedSharding(mesh, P("data")))

  def loss(q, k, v):
    out = attention.dot_product_attention(q, k, v, "auto", **kwargs)
    return jnp.sum(out.astype(jnp.float32) ** 2)

  with attention.compile_target(target.platform):
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, k)
  return lowered.compile(compiler_options=target.compiler_options or None).as_text()


@pytest.mark.parametrize("length", [2111, 2112])  # the paper's stage-3 row is 2111
def test_h100_trains_cudnn_attention_at_odd_and_even_lengths(length):
  text = _attention_hlo(_target("gpu"), length, is_causal=True)
  assert len(_custom_calls(text, FMHA + "SoftmaxBackward")) == 1
  assert len(_custom_calls(text, FMHA + "Softmax\"")) == 1


@pytest.mark.parametrize("case", [
    dict(dtype=jnp.float32),                      # cuDNN flash needs bf16/fp16
    dict(head_dim=160),                           # or head_dim <= 128, a multiple of 8
    dict(mask=jnp.tril(jnp.ones((1, 1, 65, 65), bool))),  # an explicit mask: XLA
])
def test_h100_auto_uses_xla_where_cudnn_does_not_apply(case):
  text = _attention_hlo(_target("gpu"), 65, **case)
  assert not _custom_calls(text, FMHA)


@pytest.fixture(scope="module")
def h100_tiny_step():
  target = _target("gpu")
  config = tiny_bf16()
  mesh = aot.target_mesh(config, target)
  compiled = []
  row = aot.measure(config, mesh, top=2, target=target, on_compiled=compiled.append)
  return row, compiled[0].as_text()


@pytest.mark.slow
def test_h100_tiny_train_step_uses_cudnn_in_llm_and_clip(h100_tiny_step):
  _, text = h100_tiny_step
  forward = _custom_calls(text, FMHA + "Softmax\"")
  backward = _custom_calls(text, FMHA + "SoftmaxBackward")
  # The LLM trains (forward and backward); the CLIP tower is frozen in stage 3.
  assert any("llm" in name for name in forward), forward
  assert any("llm" in name for name in backward), backward
  assert any("clip" in name for name in forward), forward


@pytest.mark.slow
def test_h100_measure_reports_the_compilers_memory(h100_tiny_step):
  row, _ = h100_tiny_step
  assert row["device_kind"] == "NVIDIA H100 80GB HBM3"
  assert row["compiler"] == f"jax-cuda12-plugin {targets.package_version('jax-cuda12-plugin')}"
  assert row["memory"] == int(84942979072 * targets.gpu_memory_fraction())
  assert row["fits"] is True
  assert 0 < row["peak"] < 1 * GIB and row["temp"] > 0
  assert row["total"] >= row["params"] + row["optimizer"]


@pytest.mark.slow
def test_tpu_v5e_measure_and_attention_stays_xla():
  target = _target("tpu")
  assert target.device_kind == "TPU v5 lite" and target.memory_bytes == 16 * GIB
  config = tiny_bf16()
  mesh = aot.target_mesh(config, target)
  row = aot.measure(config, mesh, top=2, target=target)
  assert row["fits"] is True and row["devices"] == 4
  assert row["device_kind"] == "TPU v5 lite" and row["memory"] == 16 * GIB
  assert row["compiler"] == targets.tpu_compiler() != "libtpu unknown"
  assert row["params"] + row["optimizer"] <= row["total"] < 1 * GIB
  assert row["peak"] < 1 * GIB


@pytest.mark.slow
def test_tpu_v5e_llm_trains_with_splash_attention_under_fsdp():
  target = _target("tpu")
  config = tiny_bf16()
  config.model.llm["head_dim"] = 128  # splash needs the lane width; the tiny LLM has 32
  mesh = aot.target_mesh(config, target, {"fsdp": -1})
  compiled = []
  row = aot.measure(config, mesh, top=0, target=target, on_compiled=compiled.append)
  kernels = {line.split()[0].lstrip("%").rsplit(".", 1)[0]
             for line in compiled[0].as_text().splitlines()
             if 'custom_call_target="tpu_custom_call"' in line}
  # The forward (keeping its log-sum-exp) and the dq and dkv kernels of the backward.
  # Only the LLM's attention is causal self-attention (the towers' stays XLA).
  assert kernels == {"splash_mha_fwd_residuals", "splash_mha_dq_no_residuals",
                     "splash_mha_dkv_no_residuals"}, kernels
  assert row["fits"] is True


@pytest.mark.slow
def test_tpu_v5e_splash_attention_needs_less_memory_than_xla():
  from benchmarks import tpu_attention
  _target("tpu")
  device = targets.tpu_target("v5e:2x2").devices[0]
  xla = tpu_attention.measure("xla", 2048, 1, device)
  splash = tpu_attention.measure("splash", 2048, 1, device)
  assert xla["kernel_calls"] == 0 and splash["kernel_calls"] >= 3
  # XLA keeps at least the [16 heads, 2048, 2048] bf16 probabilities (128 MiB);
  # splash keeps no [T, T] array (4 layers: 0.82 GiB against 0.57).
  assert splash["temp"] < xla["temp"] - 128 * 2**20, (splash, xla)


def test_multi_slice_tpu_target_puts_slices_on_data():
  target = _target("tpu")  # skips without libtpu
  two = targets.tpu_target("v5e:2x2", slices=2)
  assert len(two.devices) == 8 and "2 slices" in two.name
  mesh = aot.target_mesh(tiny_bf16(), two, {"fsdp": -1})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert target.memory_bytes == two.memory_bytes


def test_tpu_compiler_names_the_libtpu_that_tpu_library_path_loads(tmp_path, monkeypatch):
  monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
  assert targets.tpu_compiler() == f"libtpu {targets.package_version('libtpu')}"
  # An unpacked wheel: <root>/libtpu/libtpu.so beside <root>/libtpu-<version>.dist-info.
  (tmp_path / "libtpu").mkdir()
  (tmp_path / "libtpu-0.0.43.2.dist-info").mkdir()
  monkeypatch.setenv("TPU_LIBRARY_PATH", str(tmp_path / "libtpu" / "libtpu.so"))
  assert targets.tpu_compiler() == "libtpu 0.0.43.2"
  monkeypatch.setenv("TPU_LIBRARY_PATH", "/elsewhere/libtpu.so")
  assert targets.tpu_compiler() == "libtpu at /elsewhere/libtpu.so"


# ------------------------------------------------------------------------------ fit

def _fake_target(memory):
  return targets.Target("fake", "cpu", jax.devices()[:4], "cpu", memory)


def fake_measure(trial, mesh, top, target):
  """A step whose memory halves with each doubling of accumulation: 64 GiB / accum."""
  del mesh, top
  accum = int(trial.optimizer.grad_accum_steps)
  peak = 64 * GIB // accum
  return {"grad_accum_steps": accum, "remat_policy": trial.model.llm["remat_policy"],
          "peak": peak, "fits": peak <= target.memory_bytes}


def _fit_config_and_mesh():
  config = tiny_bf16()
  config.data.batch_size = 64
  return config, aot.target_mesh(config, targets.cpu_target(4))


def test_fit_finds_the_smallest_accumulation_that_fits():
  config, mesh = _fit_config_and_mesh()
  tried = []
  best = aot.fit(config, mesh, _fake_target(16 * GIB), report=tried.append,
                 measure_fn=fake_measure)
  assert aot.accumulation_choices(config, mesh) == [1, 2, 4, 8, 16]
  assert best["grad_accum_steps"] == 4
  assert [row["grad_accum_steps"] for row in tried] == [4, 1, 2]  # a binary search
  assert aot.fit(config, mesh, _fake_target(1 * GIB), measure_fn=fake_measure) is None


@pytest.mark.parametrize("start, memory, tried, best", [
    (4, 16, [4, 2], 4),        # fits at the guess, not below: 2 compiles
    (16, 16, [16, 8, 4, 2], 4),  # a guess too large walks down
    (1, 16, [1, 2, 4], 4),     # too small walks up
    (16, 1, [16], None),       # the largest accumulation does not fit: nothing does
])
def test_fit_walks_from_a_starting_accumulation(start, memory, tried, best):
  config, mesh = _fit_config_and_mesh()
  rows = []
  row = aot.fit(config, mesh, _fake_target(memory * GIB), report=rows.append,
                measure_fn=fake_measure, start=start)
  assert [r["grad_accum_steps"] for r in rows] == tried
  assert (row and row["grad_accum_steps"]) == best


def test_fit_tries_stronger_remat_when_asked():
  config = tiny_bf16()
  config.model.llm["remat_policy"] = "dots"
  mesh = aot.target_mesh(config, targets.cpu_target(4))
  saving = {"none": 1, "dots": 1, "dots_no_batch": 2, "full": 8}

  def fake_measure(trial, mesh, top, target):
    policy = trial.model.llm["remat_policy"]
    peak = 8 * GIB // saving[policy]
    return {"grad_accum_steps": int(trial.optimizer.grad_accum_steps),
            "remat_policy": policy, "peak": peak, "fits": peak <= target.memory_bytes}

  target = _fake_target(1 * GIB)
  assert aot.fit(config, mesh, target, measure_fn=fake_measure) is None
  best = aot.fit(copy.deepcopy(config), mesh, target, try_remat=True,
                 measure_fn=fake_measure)
  assert best["remat_policy"] == "full" and best["grad_accum_steps"] == 1
  assert config.model.llm["remat_policy"] == "dots"  # the caller's config is untouched


# ------------------------------------------------------------------- vision towers

def _tower_cases():
  from leo_mini_jax.models.vision import clip, eva02, pix2struct, sam
  bf16 = dict(dtype="bfloat16")
  return {
      "clip": (clip.ClipVisionTower, clip.ClipConfig(
          image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=2,
          num_heads=2, **bf16), True),
      "eva02": (eva02.Eva02Tower, eva02.Eva02Config(
          image_size=96, patch_size=16, hidden_size=32, intermediate_size=48, num_layers=4,
          num_heads=2, window_size=4, window_block_indexes=(0, 2), pretrain_grid=5,
          rope_pretrain_grid=3, **bf16), True),
      "pix2struct": (pix2struct.Pix2StructTower, pix2struct.Pix2StructConfig(
          hidden_size=32, num_layers=2, num_heads=4, head_dim=8, mlp_dim=40, patch_size=4,
          seq_len=12, max_patches=27, image_size=20, **bf16), True),
      "sam": (sam.SamVisionTower, sam.SamConfig(
          image_size=48, patch_size=8, hidden_size=16, mlp_dim=32, num_layers=4,
          num_heads=2, window_size=4, global_attn_indexes=(1, 3), output_channels=4,
          use_rel_pos=False, **bf16), True),
      # SAM's decomposed relative-position bias: cuDNN takes no such bias → XLA.
      "sam_rel_pos": (sam.SamVisionTower, sam.SamConfig(
          image_size=48, patch_size=8, hidden_size=16, mlp_dim=32, num_layers=4,
          num_heads=2, window_size=4, global_attn_indexes=(1, 3), output_channels=4,
          use_rel_pos=True, **bf16), False),
  }


@pytest.mark.slow
@pytest.mark.parametrize("name", ["clip", "eva02", "pix2struct", "sam", "sam_rel_pos"])
def test_h100_vision_towers_train_with_cudnn_attention_where_it_applies(name):
  target = _target("gpu")
  tower_class, config, cudnn = _tower_cases()[name]
  tower = tower_class(config)
  mesh = jax.sharding.Mesh(target.devices, ("data",))
  size = config.image_size
  pixels = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32,
                                sharding=NamedSharding(mesh, P("data")))
  params = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())),
      nn.meta.unbox(jax.eval_shape(
          lambda: tower.init(jax.random.key(0), jnp.zeros(pixels.shape)))))

  def loss(params, pixels):
    return jnp.sum(tower.apply(params, pixels).astype(jnp.float32) ** 2)

  with attention.compile_target("gpu"):
    lowered = jax.jit(jax.grad(loss)).lower(params, pixels)
  text = lowered.compile(compiler_options=target.compiler_options).as_text()
  forward = _custom_calls(text, FMHA + "Softmax\"")
  backward = _custom_calls(text, FMHA + "SoftmaxBackward")
  if cudnn:
    assert forward and backward, name
  else:
    assert not forward and not backward, name
