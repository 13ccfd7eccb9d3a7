"""The grain input pipeline: source → shuffle → process shard → tokenize → batch.

One entry point, `make_dataset(data_cfg, tokenizer, template, split, ...)`, driven by the
`data` ConfigDict of `default_data_config()`. It returns a `DataPipeline` whose
`iterator()` is a grain `DatasetIterator`: `get_state()` / `set_state(state)` resume the
exact sequence, and orbax saves it beside the train state with
`grain.checkpoint.CheckpointSave(iterator)` / `CheckpointRestore(iterator)`.

Modes:
  train     infinite: a global seeded shuffle per epoch (different every epoch), then
            process p takes positions p, p+P, ... — the process shards of an epoch are
            disjoint and cover it. Yields batch dicts. With data.packing the positions
            are packed rows of a global per-epoch plan (packing.py), several examples
            per row, in the packed batch layout of batch.py.
  eval      one pass in file order, teacher-forced full conversations. Yields
            (batch, meta); every process yields the same number of batches (the tail is
            padded with rows whose meta 'valid' is False and whose loss_mask is 0).
  generate  like eval but prompt-only (turns before the first gpt turn + the assistant
            header); meta carries the reference answer.

Batch dict (per process, B = data.batch_size / process_count, L = data.max_length,
S = data.resolution):
  input_ids        int32 [B, L]  right-padded with tokenizer.pad_id; one
                                 IMAGE_PLACEHOLDER_ID (-200) per image example
  attention_mask   int32 [B, L]  1 on real tokens (a prefix of each row)
  loss_mask        int32 [B, L]  1 on assistant tokens incl. their end-of-turn token
  instruction_mask int32 [B, L]  1 on user message text
  image            uint8 [B, S, S, 3]  zeros for text-only rows
  has_image        bool  [B]
Meta (eval/generate): {'id': [str], 'question_type': [str], 'answer': [str],
'valid': bool [B]}.

A record that fails in the transform despite validation (an image that passed the
header check but does not decode) becomes a row with one real token and no loss, and is
logged with its id: a run never stops midway on bad data.
"""

import dataclasses
import math
from typing import Any, Sequence

import grain
import ml_collections

from leo_mini_jax import batch as batch_lib
from leo_mini_jax.batch import BATCH_KEYS  # pylint: disable=unused-import (re-exported)
from leo_mini_jax.data import conversation as conversation_lib
from leo_mini_jax.data import encoder as encoder_lib
from leo_mini_jax.data import fingerprint as fingerprint_lib
from leo_mini_jax.data import images as images_lib
from leo_mini_jax.data import llava
from leo_mini_jax.data import packing
from leo_mini_jax.data import parent_watch
from leo_mini_jax.data import synthetic
from leo_mini_jax.data import tokenizers as tokenizers_lib
from leo_mini_jax.data import validation

# Re-exported: callers know them from here (encoder.py owns them).
ExampleEncoder = encoder_lib.ExampleEncoder
collate, collate_with_meta = encoder_lib.collate, encoder_lib.collate_with_meta

MODES = ("train", "eval", "generate")
KINDS = ("synthetic", "llava", "tfds")
PADDING_RECORD = {"id": "", "padding": True}  # grain drops None elements, so pad with this


def default_data_config() -> ml_collections.ConfigDict:
  """The `data` config section with its defaults (configs start from this)."""
  c = ml_collections.ConfigDict()
  c.kind = "synthetic"           # 'synthetic' | 'llava' | 'tfds'
  c.train_json = ""              # llava: LLaVA JSON of the train split
  c.eval_json = ""               # llava: LLaVA JSON of the eval split (reference = 1st gpt)
  c.image_root = ""              # llava: image paths are relative to this ('' = JSON dir)
  c.tfds_dir = ""                # tfds: data_dir of a tfds_builder build (or its version dir)
  c.tfds_train_split = "train"
  c.tfds_eval_split = "eval"
  c.strict = False               # stop at start on the first bad record instead of skipping
  c.validate = True              # scan records at start (llava: images too; tfds: lengths)
  c.image_check = "verify"       # 'verify' (header/structure) | 'exists' | 'decode'
  c.max_image_pixels = 1 << 26   # larger images (decompression bombs) are skipped
  c.max_image_bytes = 1 << 26    # larger image files are skipped (64 MiB)
  c.max_aspect_ratio = 20.0      # thinner/taller images (long/short side) are skipped
  # Image paths that resolve (links followed) outside image_root are skipped unless True.
  c.allow_images_outside_root = False
  c.max_length = 256             # text tokens per row; the placeholder counts as one
  # True: max_length bounds the LLM sequence, text + N^V visual tokens (EAGLE/LLaVA cut
  # the embedded sequence to model_max_length), so an image row keeps
  # max_length − (N^V − 1) text tokens and the model's sequence is max_length long.
  c.max_length_counts_visual_tokens = False
  c.overlong = "truncate"        # 'truncate' | 'drop'
  c.allow_truncation = False     # else stop at start when > max_truncated_fraction is cut
  c.max_truncated_fraction = 0.01
  c.instruction_turns = "first"  # CoTR/router text: 'first' human turn | 'all' turns
  c.resolution = 64              # master image resolution sent to the device
  c.image_mean_rgb = (122, 116, 104)  # square-padding colour: CLIP mean as uint8 RGB
  # Non-square images: 'pad' to square with image_mean_rgb (LLaVA/EAGLE SFT, expand2square)
  # or 'crop' (resize the shortest side, centre crop: their pre-training). base_config
  # sets 'crop' for stage 1.
  c.image_aspect = "pad"
  # 'vicuna_v1' | 'llama3' (EAGLE's) | 'llama3_llava_next' | 'plain' | 'auto' (from vocab)
  c.template = "vicuna_v1"
  # '<image>' placement: 'front' = "<image>\n" + the rest of the turn, as LLaVA/EAGLE's
  # preprocess_multimodal; 'as_is' = where the record puts it.
  c.image_position = "front"
  c.system_prompt = ml_collections.config_dict.placeholder(str)  # None = template default
  c.tokenizer = "byte"           # for load_tokenizer when make_dataset gets none
  c.num_train = 10_000           # synthetic: examples in the train split
  c.num_eval = 500               # synthetic: examples in the eval split
  c.synthetic_question_types = synthetic.QUESTION_TYPES
  c.synthetic_style = "auto"     # 'vqa' | 'caption' | 'auto' (caption iff template 'plain')
  c.batch_size = 32              # global rows; each process gets batch_size / process_count
  # Train rows hold several examples each (packing.py); eval/generate are never packed.
  c.packing = False
  c.max_images_per_row = 4       # packing: image slots per row (K); a row closes at K
  c.packing_window = packing.DEFAULT_WINDOW  # packing: rows open at once (1 = next-fit)
  c.num_workers = 0              # grain worker processes (0 = in-process threads only)
  c.read_threads = 2             # threads preparing batches in each process
  c.prefetch_batches = 4         # batches prepared ahead per process
  c.seed = 0                     # shuffle seed and synthetic scene seed
  c.on_change = "stop"           # resume with other usable records: 'stop' | 'warn'
  return c


def resolve_template(data_cfg, tokenizer: tokenizers_lib.Tokenizer,
                     template: Any = None) -> conversation_lib.Template:
  """The Template object: an explicit one, else data.template ('auto' = from the vocab)."""
  if isinstance(template, conversation_lib.Template):
    return template
  name = template or data_cfg.template
  if name == "auto":
    name = tokenizers_lib.template_for(tokenizer)
  return conversation_lib.get_template(name, data_cfg.get("system_prompt"),
                                      data_cfg.get("image_position", "front"))


class Subset:
  """The records of `source` at `indices` (what validation kept)."""

  def __init__(self, source, indices: Sequence[int]):
    self.source, self.indices = source, list(indices)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int):
    return self.source[self.indices[int(index)]]


class ProcessShard:
  """Positions p, p+P, p+2P, ... of `source`, padded with PADDING_RECORD to `length`."""

  def __init__(self, source, process_index: int, process_count: int, length: int):
    self.source, self.length = source, length
    self.process_index, self.process_count = process_index, process_count

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index: int):
    position = self.process_index + int(index) * self.process_count
    return self.source[position] if position < len(self.source) else PADDING_RECORD


def build_source(data_cfg, split: str, encoder: ExampleEncoder,
                 shard: tuple[int, int] = (0, 1)
                 ) -> tuple[Any, llava.ValidationReport | None]:
  """The validated random-access source of `split` for data.kind."""
  kind = data_cfg.kind
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
  length_check = llava.LengthCheck(
      encoder.tokenizer, encoder.template, encoder.max_length, encoder.overlong,
      encoder.prompt_only, bool(data_cfg.get("allow_truncation", False)),
      float(data_cfg.get("max_truncated_fraction", 0.01)), encoder.visual_tokens)
  if kind == "synthetic":
    style = data_cfg.synthetic_style
    if style == "auto":
      style = "caption" if encoder.template.name == "plain" else "vqa"
    num = data_cfg.num_train if split == "train" else data_cfg.num_eval
    source = synthetic.SyntheticVQA(split, num, data_cfg.resolution, int(data_cfg.seed),
                                    tuple(data_cfg.synthetic_question_types), style)
    encoder_lib.check_synthetic_lengths(source, encoder)
    return source, None
  if kind == "llava":
    json_path = data_cfg.train_json if split == "train" else data_cfg.eval_json
    return llava.load_llava(json_path, data_cfg.image_root, length_check=length_check,
                            strict=data_cfg.strict, image_check=data_cfg.image_check,
                            validate=data_cfg.validate,
                            max_image_pixels=encoder.image_limits.max_pixels,
                            instruction_turns=encoder.instruction_turns, shard=shard,
                            image_limits=encoder.image_limits)
  if kind == "tfds":
    from leo_mini_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
    tfds_split = data_cfg.tfds_train_split if split == "train" else data_cfg.tfds_eval_split
    source = tfds_builder.TfdsSource(data_cfg.tfds_dir, tfds_split)
    if not data_cfg.validate:
      return source, None
    # Images were checked when the dataset was built (tfds_builder); here the records'
    # fields, conversations and lengths.
    kept, report = validation.validate(
        source, f"{source.dataset_dir}:{tfds_split}", lambda record: record["image"],
        length_check=length_check, strict=data_cfg.strict, image_check="",
        instruction_turns=encoder.instruction_turns, shard=shard)
    return Subset(source, kept), report
  raise ValueError(f"data.kind must be one of {KINDS}, got {kind!r}")


@dataclasses.dataclass
class DataPipeline:
  """A built pipeline. Iterate it, or keep `iterator()` to checkpoint its state."""
  dataset: grain.IterDataset
  split: str
  mode: str
  num_examples: int            # usable examples in the split (all processes)
  local_batch_size: int        # rows per batch in this process
  num_batches: int | None      # batches per process for eval/generate; None = infinite
  report: llava.ValidationReport | None
  tokenizer: tokenizers_lib.Tokenizer
  template: conversation_lib.Template
  fingerprint: str = ""        # of the usable records (fingerprint.py); saved on resume
  plan: packing.RowPlan | None = None  # data.packing: the global row plan (train mode)

  def iterator(self) -> grain.DatasetIterator:
    """A fresh iterator; `get_state()`/`set_state()` save and restore its position."""
    return iter(self.dataset)

  def __iter__(self):
    return self.iterator()


@dataclasses.dataclass
class PreparedSource:
  """A split's validated source and its encoder, before any iteration order exists.

  `prepare_source` builds it (the start-up validation); `make_dataset(prepared=...)`
  turns it into a pipeline without validating again. `len(source)` is the number of
  usable records of the split (all processes).
  """
  source: Any
  report: llava.ValidationReport | None
  encoder: ExampleEncoder
  split: str
  mode: str
  process_index: int
  process_count: int
  costs: Any = None  # packing.Costs, filled on first use (packing.example_costs)

  @property
  def num_examples(self) -> int:
    return len(self.source)


llm_length_limit = batch_lib.llm_length_limit  # the batch contract owns it


def counted_visual_tokens(data_cfg, mode: str, num_visual_tokens: int | None) -> int:
  """What an image placeholder counts against max_length in `mode` (see fit_to_length).

  Generation prompts always count it as one: prefill never cuts the sequence, so a
  prompt is only checked against the model's context.
  """
  if not data_cfg.get("max_length_counts_visual_tokens") or mode == "generate":
    return 1
  if num_visual_tokens is None:
    raise ValueError("data.max_length_counts_visual_tokens=True needs the model's number "
                     "of visual tokens: pass num_visual_tokens (model.config."
                     "num_visual_tokens) to prepare_source / make_dataset")
  if not 1 <= num_visual_tokens < int(data_cfg.max_length):
    raise ValueError(f"data.max_length={data_cfg.max_length} leaves no text beside "
                     f"{num_visual_tokens} visual tokens (data.max_length_counts_visual_"
                     "tokens=True): raise data.max_length")
  return int(num_visual_tokens)


def prepare_source(data_cfg, tokenizer: tokenizers_lib.Tokenizer | None = None,
                   template: Any = None, split: str = "train",
                   process_index: int | None = None, process_count: int | None = None,
                   *, mode: str | None = None,
                   num_visual_tokens: int | None = None) -> PreparedSource:
  """Loads and validates `split` (arguments as for make_dataset)."""
  mode = mode or ("train" if split == "train" else "generate")
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  visual_tokens = counted_visual_tokens(data_cfg, mode, num_visual_tokens)
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index, process_count = jax.process_index(), jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if data_cfg.batch_size % process_count:
    raise ValueError(f"data.batch_size={data_cfg.batch_size} is not divisible by the "
                     f"process count {process_count}")
  tokenizer = tokenizer or tokenizers_lib.load_tokenizer(data_cfg.tokenizer)
  template = resolve_template(data_cfg, tokenizer, template)
  encoder = ExampleEncoder(tokenizer, template, int(data_cfg.max_length), data_cfg.overlong,
                           int(data_cfg.resolution), tuple(data_cfg.image_mean_rgb),
                           prompt_only=(mode == "generate"),
                           instruction_turns=data_cfg.get("instruction_turns", "first"),
                           image_aspect=images_lib.check_image_aspect(
                               data_cfg.get("image_aspect", "pad")),
                           image_limits=images_lib.limits_from_config(data_cfg),
                           visual_tokens=visual_tokens)
  source, report = build_source(data_cfg, split, encoder, (process_index, process_count))
  if isinstance(source, llava.LlavaSource):  # the transform enforces the same root
    encoder = dataclasses.replace(encoder, image_limits=dataclasses.replace(
        encoder.image_limits, root=source.image_root))
  if len(source) == 0:
    raise ValueError(f"{data_cfg.kind} {split} split has no usable records"
                     + (f" ({report.summary()})" if report else ""))
  return PreparedSource(source, report, encoder, split, mode, process_index, process_count)


def make_dataset(data_cfg, tokenizer: tokenizers_lib.Tokenizer | None = None,
                 template: Any = None, split: str = "train",
                 process_index: int | None = None, process_count: int | None = None,
                 seed: int | None = None, *, mode: str | None = None,
                 start_position: int = 0,
                 prepared: PreparedSource | None = None,
                 num_visual_tokens: int | None = None) -> DataPipeline:
  """Builds the pipeline of `split` for this process.

  Args:
    data_cfg: the `data` ConfigDict (see default_data_config).
    tokenizer: defaults to load_tokenizer(data_cfg.tokenizer).
    template: a Template or name; defaults to data_cfg.template.
    split: 'train' or 'eval'.
    process_index, process_count: this process's shard; default jax.process_index() /
      jax.process_count(). Tests pass them to simulate several processes.
    seed: shuffle seed; defaults to data_cfg.seed. (The synthetic scenes always use
      data_cfg.seed, so changing the shuffle seed does not change the dataset.)
    mode: 'train' | 'eval' | 'generate'; defaults to 'train' for the train split and
      'generate' for the eval split.
    start_position: train mode: examples of the global shuffled stream already consumed
      (all processes together); with data.packing, packed rows of the global row stream.
      A resumed run starts here, so the position is independent of the process count
      and batch size that consumed them.
    prepared: the split as `prepare_source` already validated it (the other arguments
      that select the data are then taken from it).
    num_visual_tokens: the model's N^V; needed (train and eval modes) when
      data.max_length_counts_visual_tokens.
  """
  if prepared is None:
    prepared = prepare_source(data_cfg, tokenizer, template, split, process_index,
                              process_count, mode=mode, num_visual_tokens=num_visual_tokens)
  mode, split = prepared.mode, prepared.split
  process_index, process_count = prepared.process_index, prepared.process_count
  source, report, encoder = prepared.source, prepared.report, prepared.encoder
  tokenizer, template = encoder.tokenizer, encoder.template
  local_batch_size = data_cfg.batch_size // process_count
  seed = int(data_cfg.seed if seed is None else seed)
  num_examples = len(source)

  plan = None
  if mode == "train":
    if data_cfg.get("packing"):  # positions count packed rows of the global row stream
      plan = packing.row_plan(prepared, data_cfg, seed)
      ds = packing.packed_dataset(prepared, plan)
      transform = packing.PackTransform(encoder, int(data_cfg.max_images_per_row))
    else:
      ds = grain.MapDataset.source(source).shuffle(seed % 2**32).repeat()
      transform = encoder_lib.TrainTransform(encoder)
    # Process p reads global positions start + p, start + p + P, ...: after k steps of
    # global batch B exactly positions [start, start + kB) are consumed, whatever P is.
    ds = ds[int(start_position) + process_index::process_count]
    ds = ds.map(transform)
    ds = ds.batch(local_batch_size, drop_remainder=True, batch_fn=encoder_lib.collate)
    num_batches = None
  else:
    per_process = math.ceil(num_examples / process_count)
    num_batches = math.ceil(per_process / local_batch_size)
    shard = ProcessShard(source, process_index, process_count,
                         num_batches * local_batch_size)
    ds = grain.MapDataset.source(shard).map(encoder)
    ds = ds.batch(local_batch_size, drop_remainder=True,
                  batch_fn=encoder_lib.collate_with_meta)
  read_options = grain.ReadOptions(num_threads=int(data_cfg.read_threads),
                                   prefetch_buffer_size=int(data_cfg.prefetch_batches))
  iter_ds = ds.to_iter_dataset(read_options)
  if data_cfg.num_workers > 0:
    _ensure_absl_flags_parsed()
    parent_watch.announce_parent()  # before the workers are spawned: they inherit it
    iter_ds = iter_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=int(data_cfg.num_workers)),
        worker_init_fn=parent_watch.exit_with_parent)  # no orphans after a SIGKILL
  return DataPipeline(iter_ds, split, mode, num_examples, local_batch_size, num_batches,
                      report, tokenizer, template,
                      fingerprint=fingerprint_lib.source_fingerprint(source), plan=plan)


def _ensure_absl_flags_parsed():
  """grain workers read absl flags; outside `app.run` (tests, notebooks) mark them parsed."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
