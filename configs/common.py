"""Shared pieces of the config files: the `arg` parser and the Table 6 stage rules."""

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'stage=3,tokens=16' → ConfigDict, typed by the defaults (big_vision style).

  Unknown keys and values that do not parse as the default's type fail by name.
  """
  values = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or key not in defaults:
      raise ValueError(f"config arg {item!r}: expected key=value with key in {sorted(defaults)}")
    default = defaults[key]
    try:
      if isinstance(default, bool):
        if raw.lower() not in ("true", "false", "1", "0"):
          raise ValueError(raw)
        values[key] = raw.lower() in ("true", "1")
      else:
        values[key] = type(default)(raw) if default is not None else raw
    except ValueError:
      raise ValueError(f"config arg {key}={raw!r}: expected a {type(default).__name__}") from None
  return ml_collections.ConfigDict(values)


def mmoe_config(enabled: bool, router_inputs: str = "multimodal") -> dict:
  """MMoE-LLM as in the paper (§4.1): E=3 LoRA experts of rank 16 + a general expert, k=1.

  λ = balance_coef = 0.05 (§4.1) multiplies the balance loss averaged over the layers
  (balance_reduce='mean'); 'sum' adds one term per layer as Switch/GShard do (32× stronger
  at 32 layers). The paper does not say which. lora_dropout 0.05 is LLaVA-1.5's LoRA
  recipe (llava/train/train.py TrainingArguments.lora_dropout), which stage 3 follows.
  """
  return dict(enabled=enabled, num_experts=3, rank=16, alpha=32.0,
              targets=("gate_proj", "up_proj", "down_proj"), top_k=1,
              gate="straight_through", router_inputs=router_inputs, router_hidden_dim=128,
              balance_coef=0.05, balance_reduce="mean", lora_dropout=0.05)


def vicuna_7b_llm() -> dict:
  return dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
              num_heads=32, num_kv_heads=32, rope_theta=10000.0, rms_norm_eps=1e-5,
              max_position_embeddings=4096, tie_embeddings=False)


def llama3_8b_llm() -> dict:
  return dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
              num_heads=32, num_kv_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5,
              max_position_embeddings=8192, tie_embeddings=False)


def clip_l14_336() -> dict:
  """HF openai/clip-vit-large-patch14-336 as EAGLE uses it (class token dropped)."""
  return dict(name="clip", image_size=336, patch_size=14, hidden_size=1024,
              intermediate_size=4096, num_layers=24, num_heads=16, hidden_act="quick_gelu",
              cls_token="drop")


def convnext_xxl() -> dict:
  """open_clip/timm convnext_xxlarge.clip_laion2b_soup at 1024 px (32×32×3072)."""
  return dict(name="convnext", image_size=1024, depths=(3, 4, 30, 3),
              dims=(384, 768, 1536, 3072))


# EAGLE normalises the master image once with the OpenAI CLIP statistics (ConvNeXt's
# processor) and feeds that to every tower, EVA-02 and SAM included; Pix2Struct undoes
# it and standardises per image (its expert sees [0, 1] pixels: mean 0, std 1).
EAGLE_MEAN = (0.48145466, 0.4578275, 0.40821073)
EAGLE_STD = (0.26862954, 0.26130258, 0.27577711)


def eva02_l() -> dict:
  """EVA-02-L ViTDet backbone of eva02_L_coco_det_sys_o365 at 1024 px (64×64×1024)."""
  return dict(name="eva02", mean=EAGLE_MEAN, std=EAGLE_STD)


def pix2struct_large() -> dict:
  """HF google/pix2struct-large's vision encoder, EAGLE's 45×45 patches (2025×1536)."""
  return dict(name="pix2struct")


def sam_l() -> dict:
  """HF facebook/sam-vit-large's image encoder with EAGLE's neck + pixel-unshuffle
  (32×32×1024)."""
  return dict(name="sam", mean=EAGLE_MEAN, std=EAGLE_STD)


# The paper's expert sets, in the order of EAGLE's releases (X4: clip-448;convnext-1024;
# det-1024;pix2struct-1024, X5 adds sam-1024 after convnext), so releases port directly.
PAPER_EXPERTS = {
    "llama3_8b": (clip_l14_336, convnext_xxl, eva02_l, pix2struct_large),
    "vicuna_7b": (clip_l14_336, convnext_xxl, sam_l, eva02_l, pix2struct_large),
}


def full_size_experts(variant: str, stage: int) -> list[dict]:
  """The paper's experts: bf16 compute over f32 weights; remat when they train (stage 2)."""
  return [dict(make(), dtype="bfloat16", param_dtype="float32", remat=stage == 2)
          for make in PAPER_EXPERTS[variant]]


def full_size_model(llm: dict, stage: int, tokens: int, reducer: str, router: str,
                    variant: str = "llama3_8b") -> dict:
  """A LEO-MINI model config at paper scale: bf16 compute, f32 master weights, remat.

  Stages 1–2 fuse experts EAGLE's way (32×32 grid, 1024 tokens); stage 3 adds CoTR with
  N^V = `tokens` and MMoE-LLM. Expert inputs are resized from the 1024-px master image as
  EAGLE resizes them (align_corners bilinear), so EAGLE releases port unchanged.
  """
  cotr_stage = stage == 3
  return dict(
      # Full remat (each layer keeps only its input for the backward pass) is what fits
      # 8-way FSDP on an 80 GB H100 in stage 2 and 256-way on a 16 GiB v5e in stage 3;
      # 'dots_no_batch' keeps every projection's output, ~4x the per-row activations
      # (benchmarks/scale.py; docs/scale.md "Memory at paper scale").
      llm=dict(llm, dtype="bfloat16", param_dtype="float32", remat_policy="full",
               mmoe=mmoe_config(cotr_stage, router)),
      experts=full_size_experts(variant, stage),
      reducer=dict(kind=reducer if cotr_stage else "none", num_visual_tokens=tokens,
                   cotr_dim=1024, grid_size=32),
      dtype="bfloat16",
      image_resize="eagle",
      vision_passes=1,
  )


def base_config(stage: int, train_sam_neck: bool = False) -> ml_collections.ConfigDict:
  """Every section a run needs, with defaults; model files fill `model` and adjust the rest.

  train_sam_neck: stage 1 also trains SAM's new EAGLE neck (EAGLE keeps it frozen).
  """
  # Imported here so that config files stay importable for shape-only tools.
  from leo_mini_jax import stages  # pylint: disable=g-import-not-at-top
  from leo_mini_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from leo_mini_jax.parallel import mesh  # pylint: disable=g-import-not-at-top
  from leo_mini_jax.training import optimizer  # pylint: disable=g-import-not-at-top

  config = ml_collections.ConfigDict()
  config.stage = stage
  config.seed = 0
  config.model = ml_collections.ConfigDict()
  config.data = pipeline.default_data_config()
  # EAGLE's stage-1 script leaves image_aspect_ratio 'square' (resize + centre crop); its
  # SFT scripts and LLaVA-1.5's pass --image_aspect_ratio pad.
  config.data.image_aspect = "crop" if stage == 1 else "pad"
  config.optimizer = optimizer.default_optimizer_config()
  # Table 6 as (regex over parameter paths, group or None = frozen); first match wins.
  config.schedule = stages.stage_schedule(stage, train_sam_neck)
  config.total_steps = 1000
  # Passes over the usable training records when total_steps=0 (the length, and the
  # cosine horizon, then follow the data: "N records × E epochs / batch B → S steps").
  config.num_epochs = 1.0
  config.log_every = 50
  # A NaN/inf step is not applied; this many in a row stop the run (training/guards.py).
  # loss_chunk_length > 0: the loss takes the LM head that many positions at a time, so
  # the [batch, length, vocab] float32 logits never exist whole (training/step.py).
  config.train = dict(max_bad_steps=10, loss_chunk_length=0)
  # A previous stage's workdir or a ported params checkpoint (porting.convert).
  config.init_from = ""
  # Axis sizes within a slice (ICI; -1 = the rest); `dcn`: slices per axis across the
  # data-centre network (multi-slice TPU, GPU hosts with process_is_granule=True).
  config.mesh = dict(data=-1, fsdp=1, tensor=1, dcn=dict(data=1, fsdp=1, tensor=1),
                     process_is_granule=False)
  config.sharding_rules = [list(rule) for rule in mesh.DEFAULT_RULES]
  # Saves every `every_steps` steps and/or `every_seconds` seconds (0 = off), at the end,
  # and at the step a preemption notice (SIGTERM) reaches.
  config.checkpoint = dict(every_steps=1000, every_seconds=0, keep=3, keep_period=0,
                           async_save=True)
  # benchmark: '' = the data config's held-out split; 'mme,pope' or 'all' = the paper's
  # benchmarks under data_dir (evaluation/benchmarks/). split: '' = each one's default.
  # max_new_tokens: 0 = each benchmark's own answer length (lmms-eval's; the held-out
  # split: 16), > 0 = this length for all. output_dir: '' = RUN/eval.
  config.eval = dict(max_new_tokens=0, batch_size=32, num_examples=0, benchmark="",
                     data_dir="", split="", skip_bad=False, routing=True, output_dir="")
  config.distributed = mesh.default_distributed_config()
  config.compilation_cache_dir = ""  # persistent XLA cache (local or gs://); '' = off
  return config


# Learning rate and global batch per stage. The paper (Appendix A.2) gives neither; it
# follows EAGLE for stages 1–2 and LLaVA-1.5's data for stage 3, so these are the
# reference scripts' values: stage 1 NVlabs/EAGLE scripts/pretrain-eagle-x5-*.sh
# (--learning_rate 1e-3; batch 256 as haotian-liu/LLaVA scripts/v1_5/pretrain.sh,
# 32 × 8 GPUs), stage 2 EAGLE scripts/finetune-eagle-x5-*-1.8m.sh (--learning_rate 2e-5;
# batch 128 as LLaVA scripts/v1_5/finetune.sh, 16 × 8), stage 3 LLaVA
# scripts/v1_5/finetune_lora.sh (--learning_rate 2e-4 for LoRA, --mm_projector_lr 2e-5
# for the projector: STAGE3_LR_MULTS; 16 × 8 = 128). All train one epoch, warmup ratio
# 0.03, cosine decay, no weight decay.
FULL_SIZE_LEARNING_RATES = {1: 1e-3, 2: 2e-5, 3: 2e-4}
FULL_SIZE_BATCH_SIZES = {1: 256, 2: 128, 3: 128}
STAGE3_LR_MULTS = {"projector": 0.1}  # 2e-5 / 2e-4 (mm_projector_lr / learning_rate)
# Image slots per packed row in stage 3: every slot runs the vision experts, filled or
# not; at a mean length of max_length/4, 4 slots pack 3.8 examples per row (6% padding)
# and more slots add vision work faster than examples (docs/performance.md, Packing).
STAGE3_IMAGES_PER_ROW = 4


def full_size_config(llm: dict, template: str, arg_string: str | None,
                     variant: str = "llama3_8b") -> ml_collections.ConfigDict:
  """A paper-scale run: LLaVA-format data, bf16 compute, FSDP over all devices.

  Point `data.train_json` / `data.image_root` / `data.tokenizer` at your data and the
  converted checkpoint's tokenizer folder, and `init_from` at the previous stage (or at
  `porting.convert`'s output for stage 1).
  """
  arg = parse_arg(arg_string, stage=3, tokens=64, reducer="cotr", router="multimodal",
                  steps=0, train_sam_neck=False)
  config = base_config(arg.stage, arg.train_sam_neck)
  config.model = full_size_model(llm, arg.stage, arg.tokens, arg.reducer, arg.router, variant)
  config.data.kind = "llava"
  config.data.template = "plain" if arg.stage == 1 else template
  config.data.tokenizer = ""  # the HF folder of the LLM (tokenizer.json / tokenizer.model)
  config.data.resolution = 1024  # EAGLE's master resolution
  config.data.max_length = 2048
  # EAGLE/LLaVA cut the sequence with its visual tokens to model_max_length=2048.
  config.data.max_length_counts_visual_tokens = True
  config.data.batch_size = FULL_SIZE_BATCH_SIZES[arg.stage]
  config.data.num_workers = 8
  # Packing (data/packing.py; benchmarks/packing.py measured it): stage 3's rows hold
  # several LLaVA-665K conversations of N^V + text tokens each. Stages 1–2 stay unpacked:
  # there an image costs 1024 of the 2048 positions (EAGLE's 32×32 fused grid), so no
  # two image examples fit one row and packing would only add the few text-only ones.
  if arg.stage == 3:
    config.data.packing = True
    config.data.max_images_per_row = min(STAGE3_IMAGES_PER_ROW,
                                         config.data.max_length // arg.tokens)
    # One pass of the frozen experts per image slot: they hold one slot's images at a
    # time, as many as unpacked rows would give them (SAM's global attention and
    # ConvNeXt's 256×256 maps over four slots needed 23 GiB of a v5e's 15.75; one pass
    # at a time, 9.3: docs/scale.md).
    config.model.vision_passes = config.data.max_images_per_row
  config.optimizer.lr = FULL_SIZE_LEARNING_RATES[arg.stage]
  if arg.stage == 3:
    config.optimizer.lr_mults = dict(STAGE3_LR_MULTS)
  config.optimizer.warmup_steps = 0.03
  # 0: one epoch of the records validation keeps (EAGLE's and LLaVA-1.5's scripts train
  # --num_train_epochs 1 per stage); `steps=N` fixes the length instead.
  config.total_steps = arg.steps
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  config.checkpoint.update(every_steps=1000, every_seconds=3600)
  config.log_every = 10
  return config
