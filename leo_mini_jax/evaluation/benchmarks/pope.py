"""POPE (object hallucination; adversarial, popular and random splits): F1 per split.

llava:   POPE/llava_pope_test.jsonl (question_id, image, text, category) + the labels in
         POPE/coco/coco_pope_<split>.json (JSON lines with question_id and label) + images
         in POPE/val2014/.
parquet: lmms-lab/POPE (question_id, question, answer, image, category).
The summary shows the mean F1 of the splits, as LLaVA reports POPE.
"""

import os

from leo_mini_jax.evaluation import scoring
from leo_mini_jax.evaluation.benchmarks import base

SPLITS = ("adversarial", "popular", "random")


@base.register
class POPE(base.Benchmark):
  name, title = "pope", "POPE"
  folders = ("POPE", "pope")

  def _sample(self, qid, question, label, split, image):
    if split not in SPLITS:
      raise base.BenchmarkError(f"unknown POPE split {split!r}; expected {SPLITS}")
    return base.Sample(id=f"{split}/{qid}", prompt=base.with_suffix(question, self.suffix),
                       image=image, target={"answers": [str(label).strip().lower()],
                                            "split": split})

  def llava_records(self):
    questions = self.require("llava_pope_test.jsonl")
    labels = {}
    for split in SPLITS:
      for r in base.load_jsonl(self.require("coco", f"coco_pope_{split}.json")):
        labels[(split, str(r["question_id"]))] = r["label"]
    image_dir = self.first_existing(["val2014", "images", "."])
    for r in base.load_records(questions):
      key = (r.get("category"), str(r.get("question_id")))
      yield questions, key[1], lambda r=r, key=key: self._sample(
          key[1], r["text"], labels[key], key[0], os.path.join(image_dir, r["image"]))

  def parquet_sample(self, row):
    return self._sample(row["question_id"], row["question"], row["answer"], row["category"],
                        base.image_value(row["image"]))

  def score(self, records):
    splits = {}
    for split in SPLITS:
      rows = [r for r in records if r["target"]["split"] == split]
      if rows:
        splits[split] = scoring.pope_metrics([r["prediction"] for r in rows],
                                             [r["target"]["answers"][0] for r in rows])
    f1 = scoring.mean(m["f1"] for m in splits.values())
    return {"score": 100.0 * f1, "splits": splits, "num_questions": len(records)}
