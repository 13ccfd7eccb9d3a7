"""Whole LEO-MINI train steps (stages 2 and 3) in JAX beside the same model in PyTorch eager.

Used by `components.py` as its `step2` / `step3` entries:

  python -m benchmarks.components --size tiny|small --components step2,step3 [--rounds 5]

JAX side: the real train step — `loop.TrainSetup` on a config built from the size's
dimensions (`model_config`), jitted as training runs it (donated state, non-finite guard),
on `workload.synthetic_batch` (a full-length batch: an image per row, instruction tokens
in the first half, supervised answer tokens in the second). Loss, gradients of the stage's
trainable set (Table 6, `stages.STAGE_SCHEDULES`) and the clipped AdamW update.

  stage 2: everything trains — both experts, the projector and the LLM (the schedule is
           ('.*', 'main')); experts fused EAGLE's way (each map resized bilinearly to the
           CLIP grid, channels concatenated).
  stage 3: the experts and the LLM base are frozen; CoTR, the projector and MMoE-LLM (LoRA
           experts + routers on every MLP's gate/up/down) train; loss + balance loss.

PyTorch side (`TorchLeoMini`): the same composition in eager mode — HF `CLIPVisionModel`
(class token dropped before the pre-LayerNorm, as EAGLE and the JAX tower do) and timm
`ConvNeXt`, each fed the master image resized (antialiased bilinear) and normalised; EAGLE's
align_corners bilinear fusion (stage 2) or the CoTR below (stage 3); a Linear-GELU-Linear
projector; the visual tokens placed at the image placeholder; HF `LlamaForCausalLM`
(sdpa attention) with cross-entropy on the supervised tokens; `clip_grad_norm_(1.0)` and
`torch.optim.AdamW` over the trained parameters. In stage 3 the experts run under
`no_grad`, the LLM base has requires_grad=False, and every MLP is wrapped by `TorchMMoEMLP`.

`TorchCoTR` and `TorchMMoEMLP` are transcriptions of `models/cotr.py` (Eq. 2–7 with its RMS
norms, √c inside the softmax, mean pools) and `models/mmoe.py` (the router's context half
applied once per example, top-1 straight-through weights, the Switch balance loss, one
batched LoRA bank per projection), written for timing: their parameters are not ported from
the JAX model, so the two sides compute the same operations on different random weights
(losses are not compared). Nothing is approximated beyond that.
"""

import jax
import ml_collections
import numpy as np

from benchmarks import bench_utils
from configs import common
from configs import tiny
from leo_mini_jax.batch import IMAGE_PLACEHOLDER_ID
from leo_mini_jax.evaluation import workload
from leo_mini_jax.parallel import mesh as mesh_lib
from leo_mini_jax.training import loop
from leo_mini_jax.training import step as step_lib

# Model dimensions of the benchmarks' 'tiny' (configs/tiny.py) and 'small' sizes.
SIZES = {
    "tiny": dict(
        batch=32,
        convnext=dict(image_size=64, dims=(8, 16, 24, 32), depths=(1, 1, 1, 1)),
        clip=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                  num_layers=2, num_heads=2),
        llm=dict(vocab_size=320, hidden_size=128, intermediate_size=256, num_layers=2,
                 num_heads=4, num_kv_heads=2),
        seq=64, visual_tokens=4, cotr_dim=32,
        mmoe=dict(rank=8, router_hidden_dim=32, lora_dropout=0.0)),  # as configs/tiny.py
    "small": dict(
        batch=8,
        convnext=dict(image_size=128, dims=(64, 128, 256, 512), depths=(1, 1, 1, 1)),
        clip=dict(image_size=128, patch_size=16, hidden_size=256, intermediate_size=1024,
                  num_layers=4, num_heads=4),
        llm=dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_layers=8,
                 num_heads=8, num_kv_heads=8),
        seq=144, visual_tokens=16, mmoe=dict(rank=16, router_hidden_dim=128), cotr_dim=256),
}


def model_config(size: dict, stage: int, batch: int) -> ml_collections.ConfigDict:
  """The tiny config's run settings with the model dimensions of `size` (SIZES).

  Text rows are `size['seq']` tokens; the LLM sees seq + N^V − 1 (N^V: the CLIP grid² in
  stage 2, `visual_tokens` in stage 3). At size 'tiny' this is configs/tiny.py itself.
  """
  config = tiny.get_config(f"stage={stage},tokens={size['visual_tokens']}")
  clip, convnext = size["clip"], size["convnext"]
  llm = dict(config.model.llm.to_dict(), **size["llm"])
  llm["mmoe"] = dict(common.mmoe_config(stage == 3, "multimodal"), **size["mmoe"])
  config.model.llm = llm
  config.model.experts = [dict(name="clip", cls_token="drop", **clip),
                          dict(name="convnext", ls_init_value=1.0, **convnext)]
  config.model.reducer.grid_size = clip["image_size"] // clip["patch_size"]
  config.model.reducer.cotr_dim = size["cotr_dim"]
  config.data.resolution = max(clip["image_size"], convnext["image_size"])
  config.data.max_length = size["seq"]
  config.data.batch_size = batch
  return config


def jax_step(config: ml_collections.ConfigDict):
  """(zero-argument callable running one real train step, its model FLOPs, the batch)."""
  setup = loop.TrainSetup(config)
  state = setup.init_state(0)
  numpy_batch = workload.synthetic_batch(config)
  batch = setup.global_batch(numpy_batch)
  step = setup.jit_train_step()
  # FLOPs from the unjitted step traced under the mesh (the jitted wrapper enters the mesh
  # itself, which cannot happen inside a trace).
  step_fn = step_lib.make_train_step(setup.model, setup.tx, setup.trainable, setup.lr_schedule,
                                     int(config.optimizer.grad_accum_steps))
  with mesh_lib.activate(setup.mesh, setup.rules):
    flops = bench_utils.model_flops(step_fn, state, batch)
  holder = {"state": state}

  def run():
    holder["state"], metrics = step(holder["state"], batch)
    return metrics
  return run, flops, numpy_batch


# ------------------------------------------------------------------------ PyTorch side


def torch_modules(torch):
  """The torch-only modules, defined once torch is importable."""
  nn = torch.nn
  F = torch.nn.functional

  class TorchCoTR(nn.Module):
    """models/cotr.py in torch: features [B, N_i, d_i] → [B, N^V, Σ d_i]."""

    def __init__(self, dims, text_dim, num_tokens, cotr_dim):
      super().__init__()
      self.scale = cotr_dim ** -0.5
      norms = lambda: nn.ModuleList(nn.RMSNorm(cotr_dim, eps=1e-6) for _ in dims)
      self.visual_proj = nn.ModuleList(nn.Linear(d, cotr_dim) for d in dims)
      self.visual_norm = norms()
      self.query_proj = nn.ModuleList(nn.Linear(d, cotr_dim) for d in dims)
      self.query_norm = norms()
      self.queries = nn.ParameterList(nn.Parameter(torch.randn(num_tokens, d)) for d in dims)
      self.text_proj = nn.Linear(text_dim, cotr_dim)
      self.text_norm = nn.RMSNorm(cotr_dim, eps=1e-6)

    def forward(self, features, text, text_mask):
      v_hat = [n(p(f)) for p, n, f in zip(self.visual_proj, self.visual_norm, features)]
      pooled_all = sum(v.mean(1) for v in v_hat)
      mask = text_mask[..., None].float()
      pooled_text = (self.text_norm(self.text_proj(text)) * mask).sum(1) / mask.sum(1).clamp(
          min=1.0)
      shared_query = pooled_all + pooled_text  # s_self + s_cross + s_text share Î_iᵀ
      out = []
      for feats, v, proj, norm, q in zip(features, v_hat, self.query_proj, self.query_norm,
                                         self.queries):
        s_query = torch.einsum("qc,bnc->bqn", norm(proj(q)), v)
        shared = torch.einsum("bc,bnc->bn", shared_query, v)
        alpha = torch.softmax((s_query + shared[:, None]) * self.scale, dim=-1)
        out.append(alpha @ feats)
      return torch.cat(out, dim=-1)

  class LoRABank(nn.Module):
    """mmoe.LoRAExperts: (α/r)·[x A_gen B_gen + Σ_i w_i x A_i B_i], B at zero."""

    def __init__(self, d_in, d_out, cfg):
      super().__init__()
      r, e = cfg["rank"], cfg["num_experts"]
      bound = d_in ** -0.5
      self.general_a = nn.Parameter(torch.empty(d_in, r).uniform_(-bound, bound))
      self.general_b = nn.Parameter(torch.zeros(r, d_out))
      self.experts_a = nn.Parameter(torch.empty(e, d_in, r).uniform_(-bound, bound))
      self.experts_b = nn.Parameter(torch.zeros(e, r, d_out))
      self.scale = cfg["alpha"] / r

    def forward(self, x, weights):
      general = (x @ self.general_a) @ self.general_b
      low_rank = torch.einsum("btd,edr->bter", x, self.experts_a) * weights[..., None]
      return (general + torch.einsum("bter,ero->bto", low_rank, self.experts_b)) * self.scale

  class TorchMMoEMLP(nn.Module):
    """A frozen LlamaMLP plus mmoe.MMoERouter and a LoRABank on gate, up and down."""

    def __init__(self, mlp, cfg, context):
      super().__init__()
      d, ffn, hidden = mlp.hidden_size, mlp.intermediate_size, cfg["router_hidden_dim"]
      self.mlp, self.context, self.num_experts = mlp, context, cfg["num_experts"]
      self.hidden_proj = nn.Linear(d, hidden)
      self.context_proj = nn.Linear(2 * d, hidden, bias=False)
      self.out_proj = nn.Linear(hidden, cfg["num_experts"])
      self.lora = nn.ModuleDict({"gate_proj": LoRABank(d, ffn, cfg),
                                 "up_proj": LoRABank(d, ffn, cfg),
                                 "down_proj": LoRABank(ffn, d, cfg)})

    def forward(self, x):
      hidden = self.hidden_proj(x) + self.context_proj(self.context["pooled"])[:, None]
      probs = torch.softmax(self.out_proj(F.gelu(hidden)), dim=-1)
      selected = F.one_hot(probs.argmax(-1), self.num_experts).to(probs.dtype)
      weights = selected * (1.0 + probs - probs.detach())  # top-1 straight-through
      fraction = selected.mean((0, 1))
      self.context["balance"].append(self.num_experts * (fraction * probs.mean((0, 1))).sum())
      proj = lambda name, h: getattr(self.mlp, name)(h) + self.lora[name](h, weights)
      act = self.mlp.act_fn(proj("gate_proj", x)) * proj("up_proj", x)
      return proj("down_proj", act)

  return TorchCoTR, TorchMMoEMLP


class TorchLeoMini:
  """The JAX model of `config` composed in torch eager; `step()` is one optimizer step."""

  def __init__(self, torch, config: ml_collections.ConfigDict, numpy_batch: dict):
    import timm.models.convnext as timm_convnext
    import transformers
    nn = torch.nn
    self.torch, self.F = torch, torch.nn.functional
    model = config.model
    clip, convnext, llm = model.experts[0], model.experts[1], model.llm
    self.stage3 = config.stage == 3
    self.clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=clip["hidden_size"], intermediate_size=clip["intermediate_size"],
        num_hidden_layers=clip["num_layers"], num_attention_heads=clip["num_heads"],
        image_size=clip["image_size"], patch_size=clip["patch_size"], hidden_act="quick_gelu",
        layer_norm_eps=1e-5, attn_implementation="sdpa"))
    self.convnext = timm_convnext.ConvNeXt(depths=tuple(convnext["depths"]),
                                           dims=tuple(convnext["dims"]), num_classes=0,
                                           ls_init_value=1.0, norm_eps=1e-5)
    self.sizes = (clip["image_size"], convnext["image_size"])
    self.grid = model.reducer.grid_size
    dims = (clip["hidden_size"], convnext["dims"][-1])
    self.llm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=llm.vocab_size, hidden_size=llm.hidden_size,
        intermediate_size=llm.intermediate_size, num_hidden_layers=llm.num_layers,
        num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
        rope_theta=llm.rope_theta, max_position_embeddings=llm.max_position_embeddings,
        tie_word_embeddings=llm.tie_embeddings, attn_implementation="sdpa"))
    self.projector = nn.Sequential(nn.Linear(sum(dims), llm.hidden_size), nn.GELU(),
                                   nn.Linear(llm.hidden_size, llm.hidden_size))
    trained = [self.projector]
    self.context = {"pooled": None, "balance": []}
    if self.stage3:
      cotr_cls, mmoe_cls = torch_modules(torch)
      self.cotr = cotr_cls(dims, llm.hidden_size, model.reducer.num_visual_tokens,
                           model.reducer.cotr_dim)
      for module in (self.clip, self.convnext, self.llm):
        module.requires_grad_(False)
      for layer in self.llm.model.layers:
        layer.mlp = mmoe_cls(layer.mlp, llm.mmoe.to_dict(), self.context)
      trained += [self.cotr] + [layer.mlp for layer in self.llm.model.layers]
    else:
      trained += [self.clip, self.convnext, self.llm]
    # Left out: what the feature path never reads (CLIP's post-LayerNorm, timm's head norm),
    # which the JAX towers do not have.
    vision = getattr(self.clip, "vision_model", self.clip)  # transformers 4.x nests it
    unused = {id(p) for m in (vision.post_layernorm, self.convnext.head) for p in m.parameters()}
    self.params = [p for m in trained for p in m.parameters()
                   if p.requires_grad and id(p) not in unused]
    opt = config.optimizer
    self.clip_norm, self.balance_coef = opt.clip_norm, llm.mmoe.balance_coef
    self.optimizer = torch.optim.AdamW(self.params, lr=opt.lr, betas=(opt.b1, opt.b2),
                                       eps=opt.eps, weight_decay=opt.weight_decay)
    self._inputs(numpy_batch)

  def _inputs(self, b):
    torch = self.torch
    self.images = torch.from_numpy(b["image"]).permute(0, 3, 1, 2).contiguous()
    ids = b["input_ids"]
    self.ids = torch.from_numpy(np.where(ids == IMAGE_PLACEHOLDER_ID, 0, ids)).long()
    self.instruction = torch.from_numpy(b["instruction_mask"])
    # The placeholder (row position 1, loop.dummy_batch) becomes N^V visual tokens; only
    # answer tokens are supervised (HF shifts labels by one itself).
    labels = torch.where(torch.from_numpy(b["loss_mask"]) > 0, self.ids, -100)
    tokens = self.grid ** 2 if not self.stage3 else self.cotr.queries[0].shape[0]
    self.labels = torch.cat([labels[:, :1], torch.full((labels.shape[0], tokens), -100),
                             labels[:, 2:]], dim=1)

  def _pixels(self, size, mean, std):
    x = self.images.float() / 255.0
    if x.shape[-1] != size:
      x = self.F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return (x - self.torch.tensor(mean).view(1, 3, 1, 1)) / self.torch.tensor(std).view(
        1, 3, 1, 1)

  def _experts(self):
    from leo_mini_jax.models.vision.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    vision = getattr(self.clip, "vision_model", self.clip)  # transformers 4.x nests it
    pixels = [self._pixels(s, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD) for s in self.sizes]
    h = vision.pre_layrnorm(vision.embeddings(pixels[0])[:, 1:])  # EAGLE: cls dropped first
    clip = vision.encoder(inputs_embeds=h).last_hidden_state  # [B, N, C]
    convnext = self.convnext.forward_features(pixels[1])  # [B, C, h, w]
    return [clip, convnext.flatten(2).transpose(1, 2)]

  def _fuse(self, features):
    """EAGLE: every map resized to the grid (align_corners bilinear), channels concatenated."""
    fused = []
    for f in features:
      b, n, c = f.shape
      if n != self.grid ** 2:
        side = int(round(n ** 0.5))
        f = self.F.interpolate(f.transpose(1, 2).reshape(b, c, side, side),
                               size=(self.grid, self.grid), mode="bilinear",
                               align_corners=True).flatten(2).transpose(1, 2)
      fused.append(f)
    return self.torch.cat(fused, dim=-1)

  def loss(self):
    torch = self.torch
    embed = self.llm.get_input_embeddings()
    text = embed(self.ids)
    if self.stage3:
      with torch.no_grad():
        features = self._experts()
      visual = self.projector(self.cotr(features, text, self.instruction))
      mask = self.instruction[..., None].float()
      pooled_text = (text * mask).sum(1) / mask.sum(1).clamp(min=1.0)
      self.context.update(pooled=torch.cat([visual.mean(1), pooled_text], -1), balance=[])
    else:
      visual = self.projector(self._fuse(self._experts()))
    embeds = torch.cat([text[:, :1], visual, text[:, 2:]], dim=1)
    loss = self.llm(inputs_embeds=embeds, labels=self.labels).loss
    if self.stage3:
      loss = loss + self.balance_coef * torch.stack(self.context["balance"]).mean()
    return loss

  def step(self):
    self.optimizer.zero_grad(set_to_none=True)
    loss = self.loss()
    loss.backward()
    self.torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
    self.optimizer.step()
    return loss.detach()


def step_entry(stage: int):
  """A components.py entry: (size, batch, dtype, torch) → (jax_fn, torch_fn, flops)."""

  def build(size, batch, dtype, torch):
    del dtype  # the step runs in the config's dtypes (float32, as the tiny config trains)
    config = model_config(size, stage, batch)
    jax_fn, flops, numpy_batch = jax_step(config)
    torch_fn = None
    if torch is not None:
      try:
        import timm  # noqa: F401
        import transformers  # noqa: F401
      except ImportError:
        return jax_fn, None, flops
      torch.manual_seed(0)
      torch_fn = TorchLeoMini(torch, config, numpy_batch).step
    return jax_fn, torch_fn, flops

  return build
