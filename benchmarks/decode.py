"""KV-cache decoding speed of the LLM against prompt length (prints numbers; not a test).

  python -m benchmarks.decode [--prompts 64,256,1024] [--new_tokens 32] [--batch 4]
      [--hidden 512 --layers 8 --ffn 1376 --heads 8 --vocab 8192] [--dtype float32]

For each prompt length P: prefill P tokens into a cache of P + new_tokens slots, then
time `new_tokens` greedy decode steps run inside one jitted `lax.scan` (as
`evaluation/generate.py` runs them), and print tokens/s (batch · new_tokens / time) and
the milliseconds per step. The cache is carried through the layer scan and each layer
writes its slots in place, so the per-token cost grows with P only through attention's
read of the cache; a cache copied through the scan on every token would add a write of
the whole cache per token.
"""

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import bench_utils
from leo_mini_jax.models import llama as llama_lib

FLAGS = flags.FLAGS


def define_flags():
  """The command-line flags (defined only when run: the modules import side by side)."""
  flags.DEFINE_list("prompts", ["64", "256", "1024"], "Prompt lengths.")
  flags.DEFINE_integer("new_tokens", 32, "Decode steps timed per prompt length.")
  flags.DEFINE_integer("batch", 4, "Rows decoded together.")
  flags.DEFINE_integer("hidden", 512, "LLM width.")
  flags.DEFINE_integer("layers", 8, "LLM layers.")
  flags.DEFINE_integer("ffn", 1376, "MLP width.")
  flags.DEFINE_integer("heads", 8, "Attention heads.")
  flags.DEFINE_integer("vocab", 8192, "Vocabulary size.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
  flags.DEFINE_integer("rounds", 3, "Timed repeats (median).")


def make_decoder(model: llama_lib.LlamaForCausalLM, new: int):
  """Jitted (prefill(params, ids, lengths) -> (logits, cache), generate(params, first,
  cache) -> (tokens [new, B], cache)): `new` greedy steps in one `lax.scan`, the cache
  donated."""

  @jax.jit
  def prefill(params, ids, lengths):
    cache_size = ids.shape[1] + new
    embeds = model.apply({"params": params}, ids, method=model.embed)
    logits, cache, _ = model.apply({"params": params}, embeds, lengths, cache_size,
                                   method=model.prefill)
    return logits, cache

  def generate(params, first, cache):
    def body(carry, _):
      token, cache = carry
      logits, cache, _ = model.apply({"params": params}, token, cache,
                                     method=model.decode_step)
      nxt = jnp.argmax(logits, -1).astype(jnp.int32)
      return (nxt, cache), nxt
    (_, cache), tokens = jax.lax.scan(body, (first, cache), None, length=new)
    return tokens, cache

  return prefill, jax.jit(generate, donate_argnums=2)


def main(argv):
  del argv
  cfg = llama_lib.LlamaConfig(
      vocab_size=FLAGS.vocab, hidden_size=FLAGS.hidden, intermediate_size=FLAGS.ffn,
      num_layers=FLAGS.layers, num_heads=FLAGS.heads, dtype=FLAGS.dtype,
      max_position_embeddings=8192)
  model = llama_lib.LlamaForCausalLM(cfg)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
                         ["params"])
  batch, new = FLAGS.batch, FLAGS.new_tokens
  print(f"{jax.devices()[0].device_kind}; LLM d{cfg.hidden_size}×{cfg.num_layers}, "
        f"batch {batch}, {new} new tokens, {cfg.dtype}")
  print(f"{'prompt':>7}{'cache MiB':>11}{'ms/step':>9}{'tokens/s':>10}")

  prefill, generate = make_decoder(model, new)
  for prompt in map(int, FLAGS.prompts):
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt)),
                      jnp.int32)
    lengths = jnp.full((batch,), prompt, jnp.int32)
    fresh = lambda: prefill(params, ids, lengths)
    logits, cache = fresh()
    first = jnp.argmax(logits, -1).astype(jnp.int32)
    bench_utils.block(generate(params, first, cache))  # compile (the cache is donated)
    times = []
    for _ in range(FLAGS.rounds):
      _, cache = bench_utils.block(fresh())
      times.append(bench_utils.timed(lambda: generate(params, first, cache)))
    step_s = bench_utils.median(times) / new
    cache_bytes = sum(cache[k].nbytes for k in ("k", "v"))
    print(f"{prompt:>7}{cache_bytes / 2**20:>11.1f}{1e3 * step_s:>9.2f}"
          f"{batch / step_s:>10.1f}", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
