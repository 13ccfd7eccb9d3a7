"""LEO-MINI: vision experts → reducer → projector → LLM with MMoE-LLM (paper Fig. 2).

The model takes the data pipeline's batch (the contract is `leo_mini_jax/batch.py`):
token ids with one image placeholder per image example, masks, and one uint8
master-resolution image per example — or, packed, several examples per row with up to K
images (`segment_ids`). The projected visual tokens replace each image's placeholder; the
text after it shifts right by N^V − 1 (`models/sequence.py`). A row's LLM sequence is
L + K(N^V − 1) long (K = 1 unpacked), so text-only examples end in padding slots and run in
the same batch. With `max_llm_length` (data.max_length_counts_visual_tokens) the training
forward cuts rows to that length, as the references cut to model_max_length.
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from leo_mini_jax import config_utils
from leo_mini_jax.batch import IMAGE_PLACEHOLDER_ID
from leo_mini_jax.models import llama as llama_lib
from leo_mini_jax.models import projector as projector_lib
from leo_mini_jax.models import reducers as reducers_lib
from leo_mini_jax.models import sequence as sequence_lib
from leo_mini_jax.models.vision import experts as experts_lib
from leo_mini_jax.parallel import strided

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LeoMiniConfig:
  llm: llama_lib.LlamaConfig
  experts: tuple[tuple[str, Any], ...]  # (registry name, expert config), in order
  reducer: reducers_lib.ReducerConfig = reducers_lib.ReducerConfig()
  dtype: str = "float32"  # reducer and projector compute dtype
  param_dtype: str = "float32"
  # How each expert's input is resized from the master image (experts.preprocess_images):
  # 'antialias', or 'eagle' for EAGLE's align_corners bilinear (ported EAGLE releases).
  image_resize: str = "antialias"
  # > 0: the training/scoring forward cuts the LLM sequence (text + visual tokens) to this
  # length, as EAGLE/LLaVA cut to model_max_length. Set from data.max_length when
  # data.max_length_counts_visual_tokens (the pipeline then fits image rows to
  # max_length − (N^V − 1) text tokens, so only padding is cut). 0: L + N^V − 1.
  max_llm_length: int = 0
  # The vision experts encode a batch's images in this many sequential passes (a scan,
  # each pass 1/vision_passes of the images, spread over the batch's devices). Frozen
  # towers (stages 1 and 3) keep nothing for the backward pass, so their peak activation
  # memory (SAM's global attention above all) falls by this factor; trained towers
  # (stage 2) keep every pass's residuals, so it only adds a loop there. A batch whose
  # image count it does not divide runs gcd(images, vision_passes) passes.
  vision_passes: int = 1

  def __post_init__(self):
    if self.image_resize not in experts_lib.IMAGE_RESIZES:
      raise ValueError(f"model.image_resize={self.image_resize!r}: expected one of "
                       f"{experts_lib.IMAGE_RESIZES}")
    if self.vision_passes < 1:
      raise ValueError(f"model.vision_passes={self.vision_passes}: must be >= 1")

  @classmethod
  def from_config(cls, cfg: Any, max_llm_length: int = 0) -> "LeoMiniConfig":
    """From the `model` ConfigDict: llm, experts (list of dicts with 'name'), reducer;
    max_llm_length comes from the data config (`batch.llm_length_limit`)."""
    values = config_utils.to_plain(cfg)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"model: unknown field(s) {unknown}; known fields are {sorted(known)}")
    if not values.get("experts"):
      raise ValueError("model.experts: at least one vision expert is required")
    return cls(
        llm=config_utils.from_config(llama_lib.LlamaConfig, values["llm"]),
        experts=tuple((m.expert, m.config)
                      for m in experts_lib.build_experts(values["experts"])[0]),
        reducer=config_utils.from_config(reducers_lib.ReducerConfig,
                                         values.get("reducer", {})),
        dtype=values.get("dtype", "float32"),
        param_dtype=values.get("param_dtype", "float32"),
        image_resize=values.get("image_resize", "antialias"),
        max_llm_length=int(max_llm_length),
        vision_passes=int(values.get("vision_passes", 1)),
    )

  @property
  def expert_names(self) -> tuple[str, ...]:
    return tuple(name for name, _ in self.experts)

  @property
  def expert_infos(self) -> tuple[experts_lib.ExpertInfo, ...]:
    return tuple(experts_lib.expert_info(name, cfg) for name, cfg in self.experts)

  @property
  def num_visual_tokens(self) -> int:
    return self.reducer.output_tokens


assemble_sequence = sequence_lib.assemble_sequence  # the batch's rows → the LLM sequence


class VisionExperts(nn.Module):
  """All experts on the one uint8 master-resolution batch; params under vision/<name>.

  With `passes` > 1 the images go through the towers in that many sequential passes
  (LeoMiniConfig.vision_passes).
  """
  experts: tuple[tuple[str, Any], ...]
  image_resize: str = "antialias"
  passes: int = 1

  def setup(self):
    for name, cfg in self.experts:  # attribute names are the parameter scopes
      setattr(self, name, experts_lib.VisionExpert(expert=name, config=cfg,
                                                   image_resize=self.image_resize))

  def _encode(self, images: Array) -> list[Array]:
    return [getattr(self, name)(images) for name, _ in self.experts]

  def __call__(self, images: Array) -> list[Array]:
    passes = math.gcd(images.shape[0], self.passes)
    if passes == 1 or self.is_initializing():
      return self._encode(images)
    # Pass p takes images p, p + passes, ... (parallel/strided.py): each pass stays spread
    # over all of the batch's devices, and no image moves between devices.
    per_pass = nn.with_logical_constraint(strided.strided_split(images, passes),
                                          (None, "activation_batch", None, None, None))
    encode = nn.scan(lambda module, carry, chunk: (carry, module._encode(chunk)),  # pylint: disable=protected-access
                     variable_broadcast="params", split_rngs={"params": False})
    _, features = encode(self, None, per_pass)
    return [strided.strided_merge(f) for f in features]


class LeoMini(nn.Module):
  config: LeoMiniConfig

  def setup(self):
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    self.vision = VisionExperts(cfg.experts, cfg.image_resize, cfg.vision_passes)
    self.reducer = reducers_lib.build_reducer(cfg.reducer, cfg.expert_names, dtype,
                                              param_dtype, name=None)
    self.projector = projector_lib.Projector(cfg.llm.hidden_size, dtype, param_dtype)
    self.llm = llama_lib.LlamaForCausalLM(cfg.llm)

  def _text_embeds(self, input_ids: Array) -> Array:
    return self.llm.embed(jnp.where(input_ids == IMAGE_PLACEHOLDER_ID, 0, input_ids))

  def encode_images(self, images: Array, text_embeds: Array,
                    instruction_mask: Array) -> Array:
    """uint8 [B·K, S, S, 3] → projected visual tokens [B·K, N^V, d_LLM].

    instruction_mask: [B, L] (K = 1) or [B, K, L], the text each image is conditioned on.
    """
    features = self.vision(images)
    grids = tuple(info.output_grid for info in self.config.expert_infos)
    reduced = self.reducer(features, grids, text_embeds, instruction_mask)
    return self.projector(reduced)

  def _inputs(self, batch: dict[str, Array]):
    """The LLM sequence (`sequence.assemble_sequence`) and the MMoE router context:
    [B, 2D] per row for unpacked batches, [B, T, 2D] per token (its own example's) for
    packed ones; None without MMoE."""
    rows = sequence_lib.as_packed(batch)
    text_embeds = self._text_embeds(rows["input_ids"])
    batch_size, num_slots = rows["has_image"].shape
    position, active = sequence_lib.image_slots(rows["input_ids"], rows["has_image"])
    text_masks = sequence_lib.image_text_masks(rows, position, active)
    images = rows["image"].reshape((batch_size * num_slots,) + rows["image"].shape[2:])
    visual = self.encode_images(images, text_embeds, text_masks)
    visual = visual.reshape((batch_size, num_slots) + visual.shape[1:])
    sequence = assemble_sequence(text_embeds, visual, rows)
    if not self.config.llm.mmoe.enabled:
      return sequence, None
    # Pooled per example from the LLM's input embeddings (docs/design.md §2.3).
    num_segments = rows["input_ids"].shape[1]  # an example has at least one token
    slot_segment = jnp.take_along_axis(rows["segment_ids"], position, axis=1)
    pooled_visual = sequence_lib.segment_means(
        jnp.mean(visual.astype(jnp.float32), axis=2), active, slot_segment, num_segments)
    instruction = rows.get("instruction_mask", jnp.zeros_like(rows["input_ids"]))
    pooled_text = sequence_lib.segment_means(text_embeds, instruction, rows["segment_ids"],
                                             num_segments)
    context = jnp.concatenate([pooled_visual, pooled_text], axis=-1).astype(
        text_embeds.dtype)  # [B, segments, 2D]
    if not sequence_lib.is_packed(batch):
      return sequence, context[:, 1]
    context = jnp.take_along_axis(context, sequence["segment_ids"][..., None], axis=1)
    return sequence, nn.with_logical_constraint(
        context, ("activation_batch", "activation_length", None))

  def __call__(self, batch: dict[str, Array], return_hidden: bool = False
               ) -> tuple[Array, dict[str, Any]]:
    """Training / scoring forward.

    Returns:
      logits [B, training_sequence_length(L), vocab] (L + N^V − 1, or max_llm_length)
      — with return_hidden the LLM's last hidden states [B, ·, D] instead, which
      `logits` maps to them (a loss can then take the vocabulary a chunk at a time) —
      and aux: targets and target_mask aligned with the
      logits, attention_mask, balance_loss (already × λ; 0 without MMoE), routing
      (per-layer expert_fraction [layers, E] and top_expert [layers, B, T]),
      num_visual_tokens.
    """
    sequence, router_context = self._inputs(batch)
    packed = sequence_lib.is_packed(batch)
    num_slots = batch["has_image"].shape[1] if packed else 1
    length = self.training_sequence_length(batch["input_ids"].shape[1], num_slots)
    sequence = {k: v[:, :length] for k, v in sequence.items()}
    if packed:
      router_context = None if router_context is None else router_context[:, :length]
    logits, layer_aux = self.llm.forward(
        sequence["inputs_embeds"], positions=sequence["positions"],
        token_mask=sequence["attention_mask"], router_context=router_context,
        segment_ids=sequence["segment_ids"] if packed else None,
        return_hidden=return_hidden)
    mmoe_cfg = self.config.llm.mmoe
    reduce_layers = jnp.sum if mmoe_cfg.balance_reduce == "sum" else jnp.mean
    balance = (mmoe_cfg.balance_coef * reduce_layers(layer_aux["balance_loss"])
               if mmoe_cfg.enabled else jnp.zeros((), jnp.float32))
    aux = {
        "targets": sequence["targets"],
        "target_mask": sequence["target_mask"],
        "attention_mask": sequence["attention_mask"],
        "balance_loss": balance,
        "routing": llama_lib.routing_of(layer_aux),
        "num_visual_tokens": self.config.num_visual_tokens,
    }
    return logits, aux

  def logits(self, hidden: Array) -> Array:
    """The LLM's last hidden states [..., D] (`__call__(..., return_hidden=True)`) →
    float32 logits [..., vocab]."""
    return self.llm.logits(hidden)

  def prefill(self, batch: dict[str, Array], cache_size: int):
    """Prompt batch → (logits of the next token [B, vocab], cache, routing).

    routing: the LLM's per-layer MMoE outputs over the prompt's LLM sequence (visual and
    text tokens; top_expert [layers, B, L + N^V − 1], real tokens first in each row,
    cache['lengths'] of them); {} without MMoE.
    """
    sequence, router_context = self._inputs(batch)
    lengths = jnp.sum(sequence["attention_mask"], axis=1).astype(jnp.int32)
    logits, cache, routing = self.llm.prefill(sequence["inputs_embeds"], lengths,
                                              cache_size, router_context)
    if router_context is not None:
      cache["router_context"] = router_context
    return logits, cache, routing

  def decode_step(self, token_ids: Array, cache: dict):
    """One generated token per row → (logits [B, vocab], cache, the token's routing:
    top_expert [layers, B, 1]; {} without MMoE)."""
    router_context = cache.get("router_context")
    llm_cache = {k: v for k, v in cache.items() if k != "router_context"}
    logits, new_cache, routing = self.llm.decode_step(token_ids, llm_cache, router_context)
    if router_context is not None:
      new_cache["router_context"] = router_context
    return logits, new_cache, routing

  def sequence_length(self, text_length: int) -> int:
    """Length of the LLM sequence for text rows of `text_length` tokens (prefill: never
    cut, prompts are checked against the context instead)."""
    return text_length + self.config.num_visual_tokens - 1

  def training_sequence_length(self, text_length: int, num_slots: int = 1) -> int:
    """Length of the training/scoring forward's LLM sequence for rows of `num_slots`
    image slots: text_length + num_slots·(N^V − 1), cut to `max_llm_length` when set."""
    full = text_length + num_slots * (self.config.num_visual_tokens - 1)
    return min(full, self.config.max_llm_length) if self.config.max_llm_length else full
