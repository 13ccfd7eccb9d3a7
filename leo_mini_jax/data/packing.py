"""Sequence packing (data.packing): several examples per training row, planned globally.

Why. Rows are data.max_length long; LLaVA/EAGLE conversations are mostly far shorter,
so unpacked most of a step's LLM work is padding. Packed, a row holds consecutive
examples of the shuffled stream, each its own segment (batch.py: `segment_ids`, the
k-th `<image>` placeholder of a row is image slot k of `image` [K, R, R, 3]); the model
keeps the segments apart, so each example trains as it would alone.

The plan is a pure function, not an iterator with state. For epoch e the usable records
are put in a seeded order (`epoch_order`: another order every epoch) and `plan_epoch`
cuts that order into rows from the examples' costs alone:

  * greedy first-fit over a bounded window: up to `window` rows are open; an example
    goes into the oldest open row it fits (tokens and image slots), else opens a new
    row, and when `window` rows are open the oldest is closed first. A row closes as
    soon as it is full or holds K = data.max_images_per_row images. window=1 is plain
    next-fit. The rows of an epoch are in the order they close; every example of the
    epoch is in exactly one row.
  * cost = the example's text tokens (capped at max_length, as truncation cuts it).
    With data.max_length_counts_visual_tokens an image example also counts its N^V − 1
    extra visual tokens, so a row's LLM sequence (text + visual tokens) fits max_length
    and the model only ever cuts padding; without it the text fits max_length and the
    LLM sequence is max_length + K·(N^V − 1) long.

`RowPlan` chains the epochs' rows into one global row stream (epoch-major). The train
pipeline is a grain MapDataset over that stream, so `start_position` counts rows of the
global stream and process p reads rows p, p+P, ...: exact resume, and resume with
another process count, need no iterator state in the checkpoint, only the row count.

The costs come from start-up validation, which tokenizes every record for its length
check anyway (ValidationReport.kept_lengths / kept_images); synthetic data and sources
read without validation are measured here by tokenizing the text (no image is decoded).
"""

import collections
import dataclasses
import logging
import sys
import threading
from typing import Any, Sequence

import grain
import numpy as np

from leo_mini_jax.data import conversation as conversation_lib
from leo_mini_jax.data import encoder as encoder_lib
from leo_mini_jax.data import synthetic

logger = logging.getLogger(__name__)

DEFAULT_WINDOW = 128
# Epoch plans kept in memory (a resumed or multi-epoch stream walks forward through them).
_CACHED_EPOCHS = 2


@dataclasses.dataclass(frozen=True)
class Costs:
  """Per usable record (source order): its cost in the row budget and whether it has an
  image."""
  tokens: np.ndarray   # int64 [N]
  images: np.ndarray   # bool [N]


def epoch_order(num: int, seed: int, epoch: int) -> np.ndarray:
  """The shuffled record order of `epoch` (the same on every process and machine)."""
  rng = np.random.default_rng(np.random.SeedSequence([int(seed) % 2**32, int(epoch)]))
  return rng.permutation(num)


def plan_epoch(costs: Costs, order: Sequence[int], capacity: int, max_images: int,
               window: int = DEFAULT_WINDOW) -> list[np.ndarray]:
  """The rows (arrays of record indices, in row order) that `order` packs into.

  Greedy first-fit over at most `window` open rows (module docstring). Pure: the same
  arguments give the same rows.
  """
  if capacity < 1 or max_images < 1 or window < 1:
    raise ValueError(f"capacity={capacity}, max_images={max_images} and window={window} "
                     "must be >= 1")
  tokens = np.asarray(costs.tokens, np.int64)
  images = np.asarray(costs.images, bool).astype(np.int64)
  order = np.asarray(order, np.int64)
  bad = order[(tokens[order] > capacity) | (tokens[order] < 1)]
  if bad.size:
    raise ValueError(f"record {int(bad[0])}: cost {int(tokens[bad[0]])} is not in "
                     f"[1, {capacity}] (data.max_length)")
  free = np.full(window, -1, np.int64)       # tokens left; -1 = no row in this slot
  slots = np.zeros(window, np.int64)         # image slots left
  opened = np.full(window, np.iinfo(np.int64).max, np.int64)  # when the row opened
  members: list[list[int]] = [[] for _ in range(window)]
  rows: list[np.ndarray] = []
  serial = 0

  def close(slot: int):
    rows.append(np.asarray(members[slot], np.int64))
    members[slot] = []
    free[slot], slots[slot], opened[slot] = -1, 0, np.iinfo(np.int64).max

  for index in order:
    cost, image = tokens[index], images[index]
    fits = (free >= cost) & (slots >= image)
    if fits.any():
      slot = int(np.argmin(np.where(fits, opened, np.iinfo(np.int64).max)))
    else:
      empty = np.flatnonzero(free < 0)
      if empty.size:
        slot = int(empty[0])
      else:  # every slot holds an open row: close the oldest
        slot = int(np.argmin(opened))
        close(slot)
      free[slot], slots[slot], opened[slot] = capacity, max_images, serial
      serial += 1
    members[slot].append(int(index))
    free[slot] -= cost
    slots[slot] -= image
    if free[slot] == 0 or slots[slot] == 0:
      close(slot)
  for slot in np.argsort(opened, kind="stable"):
    if free[slot] >= 0:
      close(int(slot))
  return rows


@dataclasses.dataclass(frozen=True)
class PackingSpec:
  """What defines the row stream besides the records: saved with the data position, so a
  resume that would read another stream is caught."""
  capacity: int      # data.max_length
  max_images: int    # data.max_images_per_row
  window: int        # data.packing_window
  counts_visual_tokens: bool
  visual_tokens: int  # what an image counts in the budget (1 unless counted)

  @classmethod
  def from_config(cls, data_cfg, visual_tokens: int) -> "PackingSpec":
    return cls(int(data_cfg.max_length), int(data_cfg.max_images_per_row),
               int(data_cfg.get("packing_window", DEFAULT_WINDOW)),
               bool(data_cfg.get("max_length_counts_visual_tokens", False)),
               int(visual_tokens))

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


class RowPlan:
  """The global packed-row stream: epoch 0's rows, then epoch 1's, ...

  `plan[g]` is the record indices of global row g. Epoch plans are computed on first
  use (thread-safe) and the latest few are cached; row counts of every planned epoch are
  kept, so locating a row costs one plan per epoch before it, once.
  """

  def __init__(self, costs: Costs, spec: PackingSpec, seed: int):
    self.costs, self.spec, self.seed = costs, spec, int(seed)
    self._counts: list[int] = []  # rows of epochs 0, 1, ...
    self._plans: collections.OrderedDict = collections.OrderedDict()
    self._lock = threading.Lock()

  def __getstate__(self):  # grain worker processes get the inputs, not the caches
    return {"costs": self.costs, "spec": self.spec, "seed": self.seed}

  def __setstate__(self, state):
    self.__init__(state["costs"], state["spec"], state["seed"])

  @property
  def num_records(self) -> int:
    return len(self.costs.tokens)

  def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(record indices of the epoch's rows concatenated, row start offsets + end)."""
    with self._lock:
      if epoch in self._plans:
        self._plans.move_to_end(epoch)
        return self._plans[epoch]
    order = epoch_order(self.num_records, self.seed, epoch)
    rows = plan_epoch(self.costs, order, self.spec.capacity, self.spec.max_images,
                      self.spec.window)
    flat = np.concatenate(rows) if rows else np.zeros((0,), np.int64)
    offsets = np.cumsum([0] + [len(r) for r in rows])
    with self._lock:
      if len(self._counts) == epoch:  # epochs are planned in order (epoch_rows)
        self._counts.append(len(rows))
      self._plans[epoch] = (flat, offsets)
      while len(self._plans) > _CACHED_EPOCHS:
        self._plans.popitem(last=False)
    return flat, offsets

  def epoch_rows(self, epoch: int) -> int:
    """Rows of `epoch` (plans every epoch before it first)."""
    while len(self._counts) <= epoch:
      self._plan(len(self._counts))
    return self._counts[epoch]

  def rows_of_epochs(self, epochs: float) -> int:
    """Rows that `epochs` passes take (a fraction of the last epoch's rows, rounded up)."""
    whole = int(epochs)
    rows = sum(self.epoch_rows(e) for e in range(whole))
    if epochs > whole:
      rows += int(np.ceil((epochs - whole) * self.epoch_rows(whole)))
    return rows

  def locate(self, row: int) -> tuple[int, int]:
    """(epoch, row within the epoch) of global row `row`."""
    if row < 0:
      raise IndexError(f"row {row} < 0")
    epoch = 0
    while row >= self.epoch_rows(epoch):
      row -= self.epoch_rows(epoch)
      epoch += 1
    return epoch, row

  def __len__(self) -> int:
    return sys.maxsize  # infinite, as grain's repeat()

  def __getitem__(self, row: int) -> np.ndarray:
    epoch, within = self.locate(int(row))
    flat, offsets = self._plan(epoch)
    return flat[offsets[within]:offsets[within + 1]]


class PackedRecords:
  """Random-access source of packed rows: item g is the list of records of row g."""

  def __init__(self, source: Any, plan: RowPlan):
    self.source, self.plan = source, plan

  def __len__(self) -> int:
    return len(self.plan)

  def __getitem__(self, row: int) -> list[Any]:
    return [self.source[int(i)] for i in self.plan[row]]


def pack_examples(examples: Sequence[dict[str, np.ndarray]], max_length: int,
                  max_images: int, pad_id: int, visual_tokens: int = 1
                  ) -> dict[str, np.ndarray]:
  """One packed row (batch.py's packed contract) from encoded examples (ExampleEncoder
  arrays, right-padded), in order: segment s = examples[s − 1]; the image examples' images
  fill slots 0, 1, ... in order, so the k-th placeholder of the row is slot k.

  Raises ValueError when they do not fit: a plan/encoding mismatch, never bad data.
  """
  first = examples[0]
  resolution = first["image"].shape[:2]
  row = {"input_ids": np.full((max_length,), pad_id, np.int32),
         "attention_mask": np.zeros((max_length,), np.int32),
         "loss_mask": np.zeros((max_length,), np.int32),
         "instruction_mask": np.zeros((max_length,), np.int32),
         "segment_ids": np.zeros((max_length,), np.int32),
         "image": np.zeros((max_images,) + resolution + (3,), np.uint8),
         "has_image": np.zeros((max_images,), bool)}
  position, slot = 0, 0
  for segment, example in enumerate(examples, 1):
    n = int(example["attention_mask"].sum())  # the encoder's tokens are a prefix
    if bool(example["has_image"]):
      if slot == max_images:
        raise ValueError(f"packed row: more than {max_images} images")
      row["image"][slot], row["has_image"][slot] = example["image"], True
      slot += 1
    end = position + n
    if end + slot * (visual_tokens - 1) > max_length:
      raise ValueError(f"packed row: {end} tokens + {slot} × {visual_tokens - 1} visual "
                       f"exceed max_length {max_length} (the plan's costs disagree with "
                       "the encoding)")
    for key in ("input_ids", "attention_mask", "loss_mask", "instruction_mask"):
      row[key][position:end] = example[key][:n]
    row["segment_ids"][position:end] = segment
    position = end
  return row


class PackTransform:
  """Records of one planned row → the packed row (picklable for grain workers)."""

  def __init__(self, encoder: encoder_lib.ExampleEncoder, max_images: int):
    self.encoder, self.max_images = encoder, max_images

  def __call__(self, records: Sequence[Any]) -> dict[str, np.ndarray]:
    examples = [self.encoder(record)[0] for record in records]
    return pack_examples(examples, self.encoder.max_length, self.max_images,
                         self.encoder.tokenizer.pad_id, self.encoder.visual_tokens)


def _tokenized_length(encoder: encoder_lib.ExampleEncoder, conversations: Any,
                      has_image: bool) -> int:
  """A record's full length as max_length counts it (validation's RecordCheck.length)."""
  full = conversation_lib.tokenize_full(conversations, has_image, encoder.tokenizer,
                                        encoder.template,
                                        instruction_turns=encoder.instruction_turns)
  return len(full) + conversation_lib.extra_visual_tokens(full, encoder.visual_tokens)


def measure_costs(source: Any, encoder: encoder_lib.ExampleEncoder) -> Costs:
  """Costs by tokenizing each record's text (synthetic data; sources not validated)."""
  lengths, images = [], []
  if isinstance(source, synthetic.SyntheticVQA):  # text from the scene, no rendering
    memo: dict[tuple[str, str], int] = {}
    for index in range(len(source)):
      texts = synthetic.turn_texts(source.scene_params(index), source.style)
      if texts not in memo:
        turns = [{"from": "human", "value": texts[0]}, {"from": "gpt", "value": texts[1]}]
        memo[texts] = _tokenized_length(encoder, turns, True)
      lengths.append(memo[texts])
      images.append(True)
  else:
    for index in range(len(source)):
      record = source[index]
      has_image = record.get("image") is not None
      try:
        lengths.append(_tokenized_length(encoder, record["conversations"], has_image))
      except Exception:  # pylint: disable=broad-except  (the transform makes it 1 token)
        lengths.append(1)
      images.append(has_image)
  return _costs(lengths, images, encoder.max_length)


def _costs(lengths: Sequence[int], images: Sequence[bool], max_length: int) -> Costs:
  # Truncation cuts a longer record to exactly max_length (text + counted visual tokens).
  tokens = np.minimum(np.maximum(np.asarray(lengths, np.int64), 1), max_length)
  return Costs(tokens, np.asarray(images, bool))


def example_costs(prepared: Any) -> Costs:
  """The costs of a PreparedSource's records: from its validation report when that
  covers them, else measured; cached on `prepared`."""
  if getattr(prepared, "costs", None) is not None:
    return prepared.costs
  report, source, encoder = prepared.report, prepared.source, prepared.encoder
  if report is not None and len(report.kept_lengths) == len(source):
    costs = _costs(report.kept_lengths, report.kept_images, encoder.max_length)
  else:
    if not isinstance(source, synthetic.SyntheticVQA):
      logger.info("packing: tokenizing %d records for their lengths (no validation "
                  "report to take them from: data.validate=False)", len(source))
    costs = measure_costs(source, encoder)
  prepared.costs = costs
  return costs


def row_plan(prepared: Any, data_cfg, seed: int) -> RowPlan:
  """The global row plan of a prepared train split."""
  spec = PackingSpec.from_config(data_cfg, prepared.encoder.visual_tokens)
  return RowPlan(example_costs(prepared), spec, seed)


def packed_dataset(prepared: Any, plan: RowPlan) -> grain.MapDataset:
  """The infinite MapDataset of packed rows (global row order, not yet sharded)."""
  return grain.MapDataset.source(PackedRecords(prepared.source, plan))
