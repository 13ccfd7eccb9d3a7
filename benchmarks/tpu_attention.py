"""Compiled memory of an LLM's gradient on a TPU target: XLA attention against splash.

  JAX_PLATFORMS=cpu aot/bin/python -m benchmarks.tpu_attention --lengths 2048,4096 \\
      [--topology v5e:2x2] [--layers 4] [--json FILE]

Compiles d(loss)/d(params) of a small Llama (hidden 2048, 16 heads of 128, 8 KV heads,
bf16 compute, f32 weights, remat 'full', one row per device) for one chip of the TPU
topology, with `attention_impl` 'xla' and 'splash', and prints the compiler's temporaries
and peak per device. Needs libtpu (requirements-aot.txt); no TPU.
"""

import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from leo_mini_jax.models import attention
from leo_mini_jax.models import llama
from leo_mini_jax.parallel import targets

FLAGS = flags.FLAGS
GIB = 2.0**30


def define_flags():
  flags.DEFINE_list("lengths", ["2048", "4096"], "Sequence lengths.")
  flags.DEFINE_list("impls", ["xla", "splash"], "attention_impl values to compare.")
  flags.DEFINE_string("topology", "v5e:2x2", "libtpu topology to take one chip of.")
  flags.DEFINE_integer("layers", 4, "LLM layers.")
  flags.DEFINE_string("json", "", "Append each row as one JSON line to this file.")


def small_llm(impl: str, layers: int) -> llama.LlamaConfig:
  return llama.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                           num_layers=layers, num_heads=16, num_kv_heads=8, head_dim=128,
                           dtype="bfloat16", param_dtype="float32", attention_impl=impl,
                           remat_policy="full")


def compile_gradient(config: llama.LlamaConfig, length: int, device, batch: int = 1):
  """The compiled gradient of a next-token-like loss for one device."""
  model = llama.LlamaForCausalLM(config)
  ids = jnp.zeros((batch, length), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), ids))

  def loss(params, ids):
    logits = model.apply(params, ids).astype(jnp.float32)
    return jnp.mean(jax.nn.logsumexp(logits, -1))

  sharding = jax.sharding.SingleDeviceSharding(device)
  place = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  with attention.compile_target(device.platform):
    lowered = jax.jit(jax.grad(loss)).lower(jax.tree.map(place, params), place(ids))
  return lowered.compile()


def measure(impl: str, length: int, layers: int, device) -> dict:
  compiled = compile_gradient(small_llm(impl, layers), length, device)
  memory = compiled.memory_analysis()
  text = compiled.as_text()
  return {"impl": impl, "length": length, "layers": layers,
          "device_kind": device.device_kind, "temp": int(memory.temp_size_in_bytes),
          "peak": int(getattr(memory, "peak_memory_in_bytes", 0) or 0),
          "kernel_calls": text.count('custom_call_target="tpu_custom_call"')}


def main(argv):
  del argv
  targets.use_host_cpu()
  device = targets.tpu_target(FLAGS.topology).devices[0]
  print(f"{'impl':<8}{'length':>8}{'temp GiB':>10}{'peak GiB':>10}{'kernels':>9}")
  for length in map(int, FLAGS.lengths):
    for impl in FLAGS.impls:
      row = measure(impl, length, FLAGS.layers, device)
      print(f"{impl:<8}{length:>8}{row['temp'] / GIB:>10.2f}{row['peak'] / GIB:>10.2f}"
            f"{row['kernel_calls']:>9}", flush=True)
      if FLAGS.json:
        with open(FLAGS.json, "a") as f:
          f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  define_flags()
  app.run(main)
