"""VizWiz VQA (val; test for the server): VQA accuracy over 10 annotators.

llava:   VizWiz/Annotations/val.json ([{image, question, answers: [{answer, ...}]}]) +
         VizWiz/val/; with eval.split=test, VizWiz/llava_test.jsonl (question_id, image,
         text) or Annotations/test.json + VizWiz/test/.
parquet: lmms-lab/VizWiz-VQA (question_id, question, answers, image).
Questions without answers (the test split) go to vizwiz_test_submission.json
([{image, answer}], answers through the EvalAI processor, as the server expects).
Prompt as lmms-eval's vizwiz_vqa task (capitalised question + the 'Unanswerable' and
single-word instructions); 1024 new tokens (the harness default).
"""

import os

from leo_mini_jax.evaluation import scoring
from leo_mini_jax.evaluation.benchmarks import base

UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."


@base.register
class VizWiz(base.Benchmark):
  name, title = "vizwiz", "VizWiz"
  folders = ("VizWiz", "vizwiz", "VizWiz-VQA")
  suffix = UNANSWERABLE + "\n" + base.SINGLE_WORD
  column, max_new_tokens = 8, base.HARNESS_DEFAULT_LENGTH
  default_split = "val"
  llava_files = "Annotations/val.json + val/ (test: llava_test.jsonl + test/)"

  def _sample(self, qid, question, answers, image_name, image):
    target = {"image": image_name}
    if answers:
      target["answers"] = [a["answer"] if isinstance(a, dict) else str(a) for a in answers]
    # lmms-eval's vizwiz_vqa_doc_to_text capitalises the question (LLaVA's test jsonl
    # text already carries the instruction).
    return base.Sample(id=str(qid), prompt=base.with_suffix(question.capitalize(), self.suffix)
                       if self.suffix not in question else question, image=image,
                       target=target)

  def llava_records(self):
    split = self.split or "val"
    if split == "test" and os.path.exists(self.where("llava_test.jsonl")):
      path = self.where("llava_test.jsonl")
      records = [dict(r, question=r["text"]) for r in base.load_records(path)]
    else:
      path = self.require("Annotations", f"{split}.json")
      records = base.load_records(path)
    image_dir = self.first_existing([split, "images", "."])
    for index, r in enumerate(records):
      qid = str(r.get("question_id", r.get("image", f"#{index}")))
      yield path, qid, lambda r=r, qid=qid: self._sample(
          qid, r["question"], r.get("answers"), r["image"], os.path.join(image_dir, r["image"]))

  def parquet_sample(self, row):
    return self._sample(row["question_id"], row["question"], row.get("answers"),
                        _image_name(row["question_id"]),
                        base.image_value(row["image"]))

  def score(self, records):
    return base.score_vqa(records, scoring.vqa_accuracy)

  def write_submission(self, records, out_dir):
    rows = [{"image": r["target"]["image"], "answer": scoring.normalize_vqa_answer(
        r["prediction"])} for r in records if "answers" not in r["target"]]
    return base.write_json_submission(os.path.join(out_dir, "vizwiz_test_submission.json"),
                                      rows)


def _image_name(question_id) -> str:
  """lmms-eval's submission names the image f"{question_id}.jpg"."""
  name = str(question_id)
  return name if name.endswith(".jpg") else name + ".jpg"
