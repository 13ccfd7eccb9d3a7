"""Forward + backward time of each component in JAX beside the PyTorch reference module.

  python -m benchmarks.components [--size tiny|small] [--rounds 7] [--batch N]
      [--components convnext,clip,projector,reducer,llm2,llm3] [--threads 2]

For each component, one JAX program (jit of the gradient of a scalar loss) and the same
module in the reference library (timm ConvNeXt, transformers CLIPVisionModel and
LlamaForCausalLM, a torch Linear-GELU-Linear) run alternately in one process, `rounds`
times each, so load from other processes hits both alike. Printed: the median of each,
the ratio (JAX time / PyTorch time: below 1 is JAX faster), the model FLOPs (matmuls and
convolutions of forward + backward) and the GFLOP/s and fraction of the matmul peak
measured in the same run.

  llm2: the whole LLM trained (stage 2).
  llm3: MMoE-LLM LoRA experts + routers trained, base frozen (stage 3). The PyTorch side is
        the same base LLM with frozen weights, backpropagating to its input embeddings:
        the same backward through every layer, without the (tiny) LoRA experts.
  reducer: CoTR over the two experts' tokens (no PyTorch reference: JAX only).
  step2, step3: the whole train step of LEO-MINI (both experts, reducer, projector, LLM,
        loss, gradients of the stage's trainable set, AdamW update) beside the same model
        in torch eager (benchmarks.steps says what each side runs); also prints the
        examples/s of each and their ratio (above 1: JAX faster). Not in the default list.

Sizes: 'tiny' is configs/tiny.py's model (batch 32, as the demo trains); 'small' is
ConvNeXt dims 64–512 depths 1,1,1,1 at 128 px, CLIP d256×4 patch 16 at 128 px, and an LLM
d512×8 (ffn 1376, 8 heads, vocab 8192) at sequence 144, batch 8. The torch references
are skipped when torch / timm / transformers are absent.
"""

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import bench_utils
from benchmarks import steps
from leo_mini_jax.models import cotr as cotr_lib
from leo_mini_jax.models import llama as llama_lib
from leo_mini_jax.models import mmoe as mmoe_lib
from leo_mini_jax.models import projector as projector_lib
from leo_mini_jax.models.vision import clip as clip_lib
from leo_mini_jax.models.vision import convnext as convnext_lib

FLAGS = flags.FLAGS


def define_flags():
  """The command-line flags (defined only when run: the modules import side by side)."""
  flags.DEFINE_enum("size", "tiny", ["tiny", "small"], "Model sizes.")
  flags.DEFINE_integer("rounds", 7, "Timed calls of each implementation.")
  flags.DEFINE_integer("batch", 0, "Batch size (0: the size's default).")
  flags.DEFINE_list("components",
                    ["convnext", "clip", "projector", "reducer", "llm2", "llm3"],
                    "Components to run.")
  flags.DEFINE_integer("threads", 2, "torch intra-op threads.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "JAX compute dtype.")


SIZES = steps.SIZES


def _rng(seed=0):
  return np.random.default_rng(seed)


def _unbox_init(module, *args):
  return nn.meta.unbox(jax.jit(module.init)(jax.random.key(0), *args)["params"])


def _try_torch():
  try:
    import torch
    torch.set_num_threads(FLAGS.threads)
    return torch
  except ImportError:
    return None


# ---------------------------------------------------------------------- components
# Each returns (jax_fn, torch_fn or None, flops): zero-argument callables doing one
# forward + backward.


def _sum_of_squares_grad(model, x):
  """(jitted grad step on x, params, flops) for a module whose loss is Σ output²."""
  params = _unbox_init(model, x[:1])
  loss = lambda p, inputs: jnp.sum(model.apply({"params": p}, inputs).astype(jnp.float32) ** 2)
  step = jax.jit(jax.grad(loss))
  return (lambda: step(params, x)), params, bench_utils.model_flops(jax.grad(loss), params, x)


def _pixels(batch, image_size):
  return jnp.asarray(_rng().standard_normal((batch, image_size, image_size, 3)), jnp.float32)


def convnext(size, batch, dtype, torch):
  cfg = convnext_lib.ConvNextConfig(**size["convnext"], ls_init_value=1.0, dtype=dtype)
  pixels = _pixels(batch, cfg.image_size)
  jax_fn, _, flops = _sum_of_squares_grad(convnext_lib.ConvNextTower(cfg), pixels)
  torch_fn = None
  if torch is not None:
    try:
      from timm.models import convnext as timm_convnext
    except ImportError:
      timm_convnext = None
    if timm_convnext is not None:
      ref = timm_convnext.ConvNeXt(depths=cfg.depths, dims=cfg.dims, num_classes=0,
                                   ls_init_value=1.0)
      x = torch.from_numpy(np.asarray(pixels).transpose(0, 3, 1, 2).copy())

      def torch_fn():
        ref.zero_grad()
        (ref.forward_features(x) ** 2).sum().backward()
  return jax_fn, torch_fn, flops


def clip(size, batch, dtype, torch):
  cfg = clip_lib.ClipConfig(**size["clip"], cls_token="keep", dtype=dtype)
  pixels = _pixels(batch, cfg.image_size)
  jax_fn, _, flops = _sum_of_squares_grad(clip_lib.ClipVisionTower(cfg), pixels)
  torch_fn = None
  if torch is not None:
    try:
      import transformers
    except ImportError:
      transformers = None
    if transformers is not None:
      c = size["clip"]
      ref = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
          hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
          num_hidden_layers=c["num_layers"], num_attention_heads=c["num_heads"],
          image_size=c["image_size"], patch_size=c["patch_size"],
          attn_implementation="sdpa"))
      x = torch.from_numpy(np.asarray(pixels).transpose(0, 3, 1, 2).copy())

      def torch_fn():
        ref.zero_grad()
        (ref(pixel_values=x).last_hidden_state[:, 1:] ** 2).sum().backward()
  return jax_fn, torch_fn, flops


def _visual_dims(size):
  return size["clip"]["hidden_size"] + size["convnext"]["dims"][-1]


def projector(size, batch, dtype, torch):
  d_in, d_llm = _visual_dims(size), size["llm"]["hidden_size"]
  # Stage 1–2 project EAGLE's fused grid (the tiny config's 16 tokens, 1024 at full size).
  tokens = 64 if size is SIZES["small"] else 16
  x = jnp.asarray(_rng().standard_normal((batch, tokens, d_in)), jnp.float32)
  jax_fn, _, flops = _sum_of_squares_grad(
      projector_lib.Projector(d_llm, dtype=jnp.dtype(dtype)), x)
  torch_fn = None
  if torch is not None:
    ref = torch.nn.Sequential(torch.nn.Linear(d_in, d_llm), torch.nn.GELU(),
                              torch.nn.Linear(d_llm, d_llm))
    tx = torch.from_numpy(np.array(x))

    def torch_fn():
      ref.zero_grad()
      (ref(tx) ** 2).sum().backward()
  return jax_fn, torch_fn, flops


def reducer(size, batch, dtype, torch):
  del torch
  c = size["clip"]
  grid_clip = (c["image_size"] // c["patch_size"]) ** 2
  grid_convnext = (size["convnext"]["image_size"] // 32) ** 2
  dims = (c["hidden_size"], size["convnext"]["dims"][-1])
  model = cotr_lib.CoTR(cotr_lib.CoTRConfig(size["visual_tokens"], size["cotr_dim"]),
                        expert_names=("clip", "convnext"), dtype=jnp.dtype(dtype))
  rng = _rng()
  feats = [jnp.asarray(rng.standard_normal((batch, n, d)), jnp.float32)
           for n, d in zip((grid_clip, grid_convnext), dims)]
  text = jnp.asarray(rng.standard_normal((batch, size["seq"], size["llm"]["hidden_size"])),
                     jnp.float32)
  mask = jnp.ones((batch, size["seq"]), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.key(0), feats, text, mask)["params"])

  def loss(p, feats):
    out = model.apply({"params": p}, feats, text, mask)
    return sum(jnp.sum(o.astype(jnp.float32) ** 2) for o in jax.tree.leaves(out))
  step = jax.jit(jax.grad(loss, argnums=(0, 1)))
  flops = bench_utils.model_flops(jax.grad(loss, argnums=(0, 1)), params, feats)
  return (lambda: step(params, feats)), None, flops


def _llm(size, batch, dtype, torch, frozen_base: bool):
  mmoe = mmoe_lib.MMoEConfig(enabled=frozen_base, router_inputs="hidden", **size["mmoe"])
  cfg = llama_lib.LlamaConfig(**size["llm"], dtype=dtype, mmoe=mmoe)
  model = llama_lib.LlamaForCausalLM(cfg)
  seq = size["seq"]
  ids = jnp.asarray(_rng().integers(0, cfg.vocab_size, (batch, seq)), jnp.int32)
  params = _unbox_init(model, ids[:1])

  def loss(trained, frozen, ids):
    p = jax.tree.map(lambda a, b: b if a is None else a, trained, frozen,
                     is_leaf=lambda x: x is None)
    logits = model.apply({"params": p}, ids).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1))

  paths = jax.tree_util.tree_flatten_with_path(params)[0]
  treedef = jax.tree.structure(params)
  is_trained = [not frozen_base or "mmoe" in jax.tree_util.keystr(k) for k, _ in paths]
  trained = jax.tree.unflatten(treedef, [v if t else None for (_, v), t in zip(paths, is_trained)])
  frozen = jax.tree.unflatten(treedef, [None if t else v for (_, v), t in zip(paths, is_trained)])
  grad = jax.grad(loss)
  step = jax.jit(grad)
  flops = bench_utils.model_flops(grad, trained, frozen, ids)
  torch_fn = None
  if torch is not None:
    try:
      import transformers
    except ImportError:
      transformers = None
    if transformers is not None:
      c = size["llm"]
      ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(
          vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
          intermediate_size=c["intermediate_size"], num_hidden_layers=c["num_layers"],
          num_attention_heads=c["num_heads"], num_key_value_heads=c["num_kv_heads"],
          attn_implementation="sdpa"))
      tids = torch.from_numpy(np.asarray(ids)).long()
      if frozen_base:
        ref.requires_grad_(False)
        embeds = ref.get_input_embeddings()(tids).detach().requires_grad_(True)

        def torch_fn():
          embeds.grad = None
          ref(inputs_embeds=embeds, labels=tids).loss.backward()
      else:
        def torch_fn():
          ref.zero_grad()
          ref(input_ids=tids, labels=tids).loss.backward()
  return (lambda: step(trained, frozen, ids)), torch_fn, flops


COMPONENTS = {
    "convnext": convnext, "clip": clip, "projector": projector, "reducer": reducer,
    "llm2": lambda *a: _llm(*a, frozen_base=False),
    "llm3": lambda *a: _llm(*a, frozen_base=True),
    "step2": steps.step_entry(2),
    "step3": steps.step_entry(3),
}


def main(argv):
  del argv
  size = SIZES[FLAGS.size]
  batch = FLAGS.batch or size["batch"]
  torch = _try_torch()
  peak = bench_utils.matmul_peak(jnp.dtype(FLAGS.dtype))
  print(f"{jax.devices()[0].device_kind}, size {FLAGS.size}, batch {batch}, JAX {FLAGS.dtype}; "
        f"matmul peak {peak / 1e9:.0f} GFLOP/s; torch "
        f"{'absent' if torch is None else torch.__version__ + f' ({torch.get_num_threads()} threads)'}")
  print(f"{'component':<10}{'JAX ms':>9}{'torch ms':>10}{'JAX/torch':>10}{'GFLOP':>8}"
        f"{'JAX GFLOP/s':>12}{'% peak':>8}{'torch GFLOP/s':>14}")
  for name in FLAGS.components:
    jax_fn, torch_fn, flops = COMPONENTS[name](size, batch, FLAGS.dtype, torch)
    fns = {"jax": jax_fn} if torch_fn is None else {"jax": jax_fn, "torch": torch_fn}
    times = bench_utils.alternate(fns, FLAGS.rounds)
    j = bench_utils.median(times["jax"])
    t = bench_utils.median(times["torch"]) if "torch" in times else float("nan")
    print(f"{name:<10}{1e3 * j:>9.1f}{1e3 * t:>10.1f}{j / t:>10.2f}{flops / 1e9:>8.2f}"
          f"{flops / j / 1e9:>12.1f}{flops / j / peak:>8.0%}{flops / t / 1e9:>14.1f}",
          flush=True)
    if name.startswith("step"):
      print(f"{'':<10}examples/s: JAX {batch / j:.1f}, torch {batch / t:.1f}, "
            f"JAX/torch {t / j:.2f}", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
