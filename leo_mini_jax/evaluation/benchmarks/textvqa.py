"""TextVQA (val; test for the server): VQA accuracy over 10 annotators.

llava:   TextVQA/llava_textvqa_val_v051_ocr.jsonl (question_id, image, text with LLaVA's
         reference OCR tokens) + answers in TextVQA/TextVQA_0.5.1_val.json + train_images/;
         with eval.split=test, TextVQA/TextVQA_0.5.1_test.json + test_images/.
parquet: lmms-lab/textvqa (question_id, question, answers, image).
Questions without answers go to textvqa_test_submission.json ([{question_id, answer}]).
"""

import os

from leo_mini_jax.evaluation import scoring
from leo_mini_jax.evaluation.benchmarks import base


@base.register
class TextVQA(base.Benchmark):
  name, title = "textvqa", "TextVQA"
  folders = ("TextVQA", "textvqa")

  def _sample(self, qid, question, answers, image):
    target = {"answers": [str(a) for a in answers]} if answers else {}
    return base.Sample(id=str(qid), prompt=base.with_suffix(question, self.suffix),
                       image=image, target=target)

  def llava_records(self):
    if self.split == "test":
      path = self.require("TextVQA_0.5.1_test.json")
      image_dir = self.first_existing(["test_images", "images", "."])
      for r in base.load_records(path):
        yield path, str(r.get("question_id")), lambda r=r: self._sample(
            r["question_id"], r["question"], None,
            os.path.join(image_dir, r["image_id"] + ".jpg"))
      return
    path = self.first_existing(["llava_textvqa_val_v051_ocr.jsonl", "llava_textvqa_val*.jsonl"])
    answers = {str(r["question_id"]): r.get("answers")
               for r in base.load_records(self.require("TextVQA_0.5.1_val.json"))}
    image_dir = self.first_existing(["train_images", "images", "."])
    for r in base.load_records(path):
      qid = str(r.get("question_id"))
      yield path, qid, lambda r=r, qid=qid: self._sample(
          qid, r["text"], answers[qid], os.path.join(image_dir, r["image"]))

  def parquet_sample(self, row):
    return self._sample(row["question_id"], row["question"], row.get("answers"),
                        base.image_value(row["image"]))

  def score(self, records):
    return base.score_vqa(records, scoring.vqa_accuracy)

  def write_submission(self, records, out_dir):
    rows = [{"question_id": _int_or_str(r["id"]), "answer": r["prediction"]}
            for r in records if "answers" not in r["target"]]
    return base.write_json_submission(os.path.join(out_dir, "textvqa_test_submission.json"),
                                      rows)


def _int_or_str(value):
  return int(value) if str(value).isdigit() else value
