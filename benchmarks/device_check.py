"""One command for the day a GPU is at hand: does the code run, and how fast (< 8 min).

  python -m benchmarks.device_check [--json out.json]
  python -m benchmarks.device_check --dry_run      # the same checks at toy sizes, any CPU

Checks, one table:
  train_tiny         the tiny stage-3 config's train step, 20 steps on one fixed batch:
                     the loss must fall
  attention_parity   cuDNN vs XLA attention in bf16 at the paper's odd stage-3 length
                     (2111 tokens; the cuDNN path pads to even): outputs and gradients
  llm_1b_step        a ~1B-parameter Llama train step (bf16 compute, f32 weights, Adam,
                     remat 'full' as the paper configs) on stage-3 rows: step time, MFU
                     (model matmul FLOPs over the device's bf16 dense peak)
  decode             the same LLM's greedy KV-cache decoding: tokens/s
Record the printed table with the device's name in docs/performance.md ("GPU").
"""

import json
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import bench_utils
from benchmarks import decode
from configs import tiny
from leo_mini_jax.evaluation import workload
from leo_mini_jax.models import attention as attention_lib
from leo_mini_jax.models import llama as llama_lib
from leo_mini_jax.training import loop

FLAGS = flags.FLAGS


def define_flags():
  """The command-line flags (defined only when run: the modules import side by side)."""
  flags.DEFINE_bool("dry_run", False, "Toy sizes (runs on a CPU in seconds).")
  flags.DEFINE_string("json", "", "Also write the rows to this JSON file.")


# bf16 dense matmul peak per device kind (vendor datasheets, no sparsity), FLOP/s.
BF16_PEAK = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12,
             "NVIDIA H200": 989e12, "NVIDIA A100-SXM4-80GB": 312e12,
             "NVIDIA A100-SXM4-40GB": 312e12}
# (full run, dry run) sizes.
LLM_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=16,
              num_heads=16, num_kv_heads=8)
LLM_TOY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
               num_heads=4, num_kv_heads=2)
STAGE3_LENGTH = 2048 + 64 - 1   # text + N^V visual tokens - the placeholder


def _row(check, ok, detail, start):
  return {"check": check, "ok": bool(ok), "detail": detail,
          "seconds": round(time.perf_counter() - start, 1)}


def train_tiny(dry_run: bool, steps: int = 20) -> dict:
  start = time.perf_counter()
  config = tiny.get_config("stage=3")
  config.data.batch_size = 8 if dry_run else 32
  setup = loop.TrainSetup(config)
  state = setup.init_state(0)
  batch = setup.global_batch(workload.synthetic_batch(config))
  step = setup.jit_train_step()
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return _row("train_tiny", losses[-1] < losses[0] and np.isfinite(losses).all(),
              f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {steps} steps", start)


def attention_parity(dry_run: bool) -> dict:
  """cuDNN (padded to even) against XLA on the same bf16 inputs, outputs and grads."""
  start = time.perf_counter()
  on_gpu = jax.default_backend() == "gpu"
  batch, length, heads, kv_heads, head_dim = (
      (1, 67, 4, 2, 32) if dry_run else (2, STAGE3_LENGTH, 32, 8, 128))
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((batch, length, h, head_dim)), jnp.bfloat16)
             for h in (heads, kv_heads, kv_heads))

  def out_and_grads(impl):
    def loss(q, k, v):
      out = attention_lib.dot_product_attention(q, k, v, impl, is_causal=True)
      return jnp.sum(out.astype(jnp.float32) ** 2), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
        q, k, v)
    return [np.asarray(x, np.float32) for x in (out, *grads)]

  reference = out_and_grads("xla")
  if on_gpu:
    other, label = out_and_grads("cudnn"), "cuDNN vs XLA"
  else:  # no cuDNN here: check the padded path the cuDNN call takes against plain XLA
    padded = jax.jit(jax.value_and_grad(
        lambda q, k, v: jnp.sum(attention_lib.padded_attention(
            q, k, v, "xla", attention_lib.CUDNN_LENGTH_MULTIPLE,
            is_causal=True).astype(jnp.float32) ** 2), argnums=(0, 1, 2)))
    other = [reference[0]] + [np.asarray(g, np.float32) for g in padded(q, k, v)[1]]
    label = "no GPU: padded XLA vs XLA"
  errors = [float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-6))
            for a, b in zip(other, reference)]
  return _row("attention_parity", max(errors) < 2e-2,
              f"{label}, T={length}: max relative error out {errors[0]:.1e}, "
              f"grads {max(errors[1:]):.1e}", start)


def _llm(dry_run: bool):
  sizes = LLM_TOY if dry_run else LLM_1B
  cfg = llama_lib.LlamaConfig(**sizes, dtype="bfloat16", param_dtype="float32",
                              remat_policy="full", max_position_embeddings=4096)
  model = llama_lib.LlamaForCausalLM(cfg)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0),
                                             jnp.zeros((1, 8), jnp.int32))["params"])
  return cfg, model, params


def llm_step(dry_run: bool, cfg, model, params) -> dict:
  start = time.perf_counter()
  batch, length = (2, 67) if dry_run else (8, STAGE3_LENGTH)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, length)),
                    jnp.int32)
  tx = optax.adamw(1e-4)

  def loss(params, ids):
    logits = model.apply({"params": params}, ids).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1))

  @jax.jit
  def step(params, opt_state, ids):
    value, grads = jax.value_and_grad(loss)(params, ids)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  opt_state = jax.jit(tx.init)(params)
  flops = bench_utils.model_flops(jax.grad(loss), params, ids)
  state = [params, opt_state]

  def run():
    state[0], state[1], value = step(state[0], state[1], ids)
    return value
  seconds = bench_utils.median(bench_utils.alternate({"step": run}, rounds=3)["step"])
  kind = jax.devices()[0].device_kind
  peak = BF16_PEAK.get(kind) or bench_utils.matmul_peak(jnp.bfloat16, 4096)
  count = sum(x.size for x in jax.tree.leaves(params))
  mfu = flops / seconds / peak
  return _row("llm_1b_step", np.isfinite(float(run())),
              f"{count / 1e9:.2f}B params, batch {batch}x{length}: {1e3 * seconds:.0f} ms, "
              f"{flops / seconds / 1e12:.1f} TFLOP/s, MFU {100 * mfu:.1f}%", start)


def decode_speed(dry_run: bool, cfg, model, params) -> dict:
  start = time.perf_counter()
  batch, prompt, new = (2, 16, 8) if dry_run else (8, 512, 128)
  prefill, generate = decode.make_decoder(model, new)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt)),
                    jnp.int32)
  lengths = jnp.full((batch,), prompt, jnp.int32)
  logits, cache = prefill(params, ids, lengths)
  first = jnp.argmax(logits, -1).astype(jnp.int32)
  bench_utils.block(generate(params, first, cache))  # compile (the cache is donated)
  _, cache = bench_utils.block(prefill(params, ids, lengths))
  seconds = bench_utils.timed(lambda: generate(params, first, cache))
  return _row("decode", seconds > 0,
              f"batch {batch}, prompt {prompt}, {new} new: {batch * new / seconds:.0f} "
              f"tokens/s ({1e3 * seconds / new:.2f} ms/step)", start)


def run_checks(dry_run: bool) -> list[dict]:
  rows = [train_tiny(dry_run), attention_parity(dry_run)]
  cfg, model, params = _llm(dry_run)
  rows += [llm_step(dry_run, cfg, model, params), decode_speed(dry_run, cfg, model, params)]
  return rows


def format_table(rows: list[dict]) -> str:
  lines = [f"device: {jax.devices()[0].device_kind} x{jax.device_count()} "
           f"({jax.default_backend()}), jax {jax.__version__}",
           f"{'check':<18}{'ok':<6}{'s':>7}  detail"]
  lines += [f"{r['check']:<18}{'yes' if r['ok'] else 'NO':<6}{r['seconds']:>7.1f}  "
            f"{r['detail']}" for r in rows]
  return "\n".join(lines)


def main(argv):
  del argv
  rows = run_checks(FLAGS.dry_run)
  print(format_table(rows))
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump({"device_kind": jax.devices()[0].device_kind, "rows": rows}, f, indent=1)
  if not all(r["ok"] for r in rows):
    raise SystemExit(1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
