"""POPE (object hallucination; adversarial, popular and random splits).

llava:   pope/llava_pope_test.jsonl (question_id numbered across the whole file, image,
         text, category = the split) + the labels in pope/coco/coco_pope_<split>.json
         (JSON lines, each file numbering its questions from 1) + images in pope/val2014/.
         As LLaVA's eval_pope.py does, a question's split is its `category` and the k-th
         question of a split takes the k-th label of that split's file.
parquet: lmms-lab/POPE (question_id, question, answer, image, category).
Prompt, answer rule and length are lmms-eval's pope task (the question + the single-word
instruction; 128 new tokens). The headline is lmms-eval's F1 over all questions (an answer
counts as yes/no only when it is exactly that); per split, LLaVA's eval_pope.py metrics
(first sentence, 'no'/'not' words) are kept beside it.
"""

import os

from leo_mini_jax.evaluation import harness_rules
from leo_mini_jax.evaluation import scoring
from leo_mini_jax.evaluation.benchmarks import base

SPLITS = ("adversarial", "popular", "random")


@base.register
class POPE(base.Benchmark):
  name, title = "pope", "POPE"
  column, max_new_tokens = 6, 128
  llava_files = "llava_pope_test.jsonl + coco/coco_pope_<split>.json + val2014/"

  def _sample(self, qid, question, label, split, image):
    if split not in SPLITS:
      raise base.BenchmarkError(f"unknown POPE split {split!r}; expected {SPLITS}")
    return base.Sample(id=str(qid), prompt=base.with_suffix(question, self.suffix),
                       image=image, target={"answers": [str(label).strip().lower()],
                                            "split": split})

  def llava_records(self):
    questions = self.require("llava_pope_test.jsonl")
    labels = {}
    for split in SPLITS:
      path = self.require("coco", f"coco_pope_{split}.json")
      labels[split] = (path, [r["label"] for r in base.load_jsonl(path)])
    image_dir = self.first_existing(["val2014", "images", "."])
    seen = dict.fromkeys(SPLITS, 0)
    for index, r in enumerate(base.load_records(questions)):
      split = r.get("category")
      position = seen.get(split)
      if position is not None:
        seen[split] += 1

      def build(r=r, split=split, position=position):
        if position is None:
          raise base.BenchmarkError(f"category {split!r} is not a POPE split {SPLITS}")
        path, split_labels = labels[split]
        if position >= len(split_labels):
          raise base.BenchmarkError(f"question {position + 1} of split {split!r}, but "
                                    f"{path} has {len(split_labels)} labels")
        return self._sample(r["question_id"], r["text"], split_labels[position], split,
                            os.path.join(image_dir, r["image"]))
      yield questions, str(r.get("question_id", f"line {index + 1}")), build
    for split, count in seen.items():
      path, split_labels = labels[split]
      if count != len(split_labels):
        reason = (f"{len(split_labels)} labels but {count} questions of split {split!r} in "
                  f"{questions}")
        if not self.skip_bad:
          raise base.BenchmarkError(f"{self.title}: {path}: {reason} (eval.skip_bad=True "
                                    "scores the paired questions)")
        self.report.skipped.append((path, split, reason))

  def parquet_sample(self, row):
    return self._sample(row["question_id"], row["question"], row["answer"], row["category"],
                        base.image_value(row["image"]))

  def score(self, records):
    predictions = [r["prediction"] for r in records]
    labels = [r["target"]["answers"][0] for r in records]
    overall = harness_rules.pope_metrics(predictions, labels)
    splits = {}
    for split in SPLITS:
      rows = [r for r in records if r["target"]["split"] == split]
      if rows:
        splits[split] = scoring.pope_metrics([r["prediction"] for r in rows],
                                             [r["target"]["answers"][0] for r in rows])
    return {"score": 100.0 * overall["f1"], **overall, "splits_llava": splits,
            "llava_mean_f1": 100.0 * scoring.mean(m["f1"] for m in splits.values()),
            "num_questions": len(records)}
