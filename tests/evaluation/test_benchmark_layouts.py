"""Benchmark files as LLaVA's eval folders and lmms-lab / `datasets` exports lay them out,
and the prompts, lengths and answer rules of the lmms-eval tasks."""

import json
import os

import openpyxl
import pytest

from leo_mini_jax.evaluation import benchmarks
from leo_mini_jax.evaluation.benchmarks import base, mmbench, mmmu
from tests.evaluation import benchmark_fixtures as fx

SINGLE = "\nAnswer the question using a single word or phrase."


def _samples(folder, name, **kwargs):
  bench = benchmarks.get(name)(str(folder), **kwargs)
  return bench, bench.samples()


def test_answer_lengths_are_the_lmms_eval_tasks():
  # generation_kwargs.max_new_tokens of each task yaml; 1024 where a task sets none.
  expected = {"mme": 16, "mmbench": 1024, "seed": 1024, "gqa": 16, "sqa": 16, "mmmu": 16,
              "pope": 128, "ai2d": 16, "vizwiz": 1024, "textvqa": 1024, "docvqa": 32,
              "chartqa": 16, "ocrbench": 128}
  assert {n: benchmarks.REGISTRY[n].max_new_tokens for n in benchmarks.ORDER} == expected


def test_pope_pairs_labels_in_file_order_per_split(tmp_path):
  perfect = fx.write(str(tmp_path), "pope", "llava")
  bench, samples = _samples(tmp_path / "pope", "pope")
  assert [s.id for s in samples] == ["1", "2", "3", "4", "5", "6"]
  # question 6 is the third adversarial one: label 3 of coco_pope_adversarial.json
  assert [(s.target["split"], s.target["answers"][0]) for s in samples] == \
      [(s, a) for s, a in fx.POPE_QUESTIONS]
  assert samples[0].prompt == "Is there a thing 1 in the image?" + SINGLE
  records = [{"id": s.id, "prediction": perfect[s.id], "target": s.target} for s in samples]
  metrics = bench.score(records)
  assert metrics["score"] == 100.0 and set(metrics["splits_llava"]) == {
      "adversarial", "popular", "random"}


def test_pope_label_count_mismatch_is_reported(tmp_path):
  fx.write(str(tmp_path), "pope", "llava")
  path = tmp_path / "pope" / "coco" / "coco_pope_random.json"
  lines = path.read_text().splitlines()
  path.write_text(lines[0] + "\n")
  with pytest.raises(base.BenchmarkError, match="record 5: question 2 of split 'random', but .*coco_pope_random.json has 1 labels"):
    _samples(tmp_path / "pope", "pope")


def test_textvqa_llava_jsonl_joins_on_image_and_question(tmp_path):
  perfect = fx.write(str(tmp_path), "textvqa", "llava")
  bench, samples = _samples(tmp_path / "textvqa", "textvqa")
  assert [s.id for s in samples] == ["34602", "34603", "34604"]
  assert samples[1].target["answers"] == ["two"] * 3 + ["2"] * 7
  assert samples[1].prompt == "how many words?\nReference OCR token: stop, sign" + SINGLE
  records = [{"id": s.id, "prediction": perfect[s.id], "target": s.target} for s in samples]
  assert bench.score(records)["score"] == pytest.approx(100.0)


def test_textvqa_parquet_prompt_has_ocr_tokens_and_test_split(tmp_path):
  fx.write(str(tmp_path), "textvqa", "parquet")
  _, samples = _samples(tmp_path / "TextVQA", "textvqa")
  assert [s.id for s in samples] == ["34602", "34603", "34604"]  # validation only
  assert samples[0].prompt == "What does it say?\nReference OCR token: stop, sign" + SINGLE
  assert samples[2].prompt == "What brand is it?\nReference OCR token: " + SINGLE
  bench, samples = _samples(tmp_path / "TextVQA", "textvqa", split="test")
  assert [(s.id, "answers" in s.target) for s in samples] == [("40000", False)]
  [path] = bench.write_submission(
      [{"id": "40000", "prediction": "The Lions.", "target": samples[0].target}],
      str(tmp_path))
  with open(path) as f:
    assert json.load(f) == [{"question_id": 40000, "answer": "lions"}]


def test_datasets_save_to_disk_export_is_read_like_parquet(tmp_path):
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  root = tmp_path / "textvqa"
  rows = [{"image_id": im, "question_id": qid, "question": q, "answers": a,
           "ocr_tokens": ocr, "image": fx._img(i)}  # pylint: disable=protected-access
          for i, (qid, im, q, ocr, a) in enumerate(fx.TEXTVQA)]
  split_dir = root / "validation"
  os.makedirs(split_dir)
  table = pa.Table.from_pylist(rows)
  with pa.OSFile(str(split_dir / "data-00000-of-00001.arrow"), "wb") as sink:
    with pa.ipc.new_stream(sink, table.schema) as writer:  # save_to_disk's format
      writer.write_table(table)
  (split_dir / "dataset_info.json").write_text(json.dumps({"features": {}}))
  (split_dir / "state.json").write_text(json.dumps({"_data_files": [
      {"filename": "data-00000-of-00001.arrow"}]}))
  (root / "dataset_dict.json").write_text(json.dumps({"splits": ["validation"]}))
  _, samples = _samples(root, "textvqa")
  assert [s.id for s in samples] == ["34602", "34603", "34604"]
  assert "Reference OCR token: stop, sign" in samples[0].prompt


def test_gqa_llava_data_folder_and_missing_files_name_every_layout(tmp_path):
  fx.write(str(tmp_path), "gqa", "llava")
  _, samples = _samples(tmp_path / "gqa", "gqa")
  assert [s.id for s in samples] == ["20968379", "20968380"]
  assert samples[0].image.endswith(os.path.join("gqa", "data", "images", "n288870.jpg"))
  os.makedirs(tmp_path / "empty" / "gqa")
  with pytest.raises(base.BenchmarkError) as error:
    _samples(tmp_path / "empty" / "gqa", "gqa")
  message = str(error.value)
  for expected in ("llava_gqa_testdev_balanced.jsonl", "data/testdev_balanced_questions.json",
                   "*.parquet", "*.arrow + dataset_info.json"):
    assert expected in message, message


def test_malformed_jsonl_line_is_a_bad_record(tmp_path):
  fx.write(str(tmp_path), "gqa", "llava")
  path = tmp_path / "gqa" / "llava_gqa_testdev_balanced.jsonl"
  lines = path.read_text().splitlines()
  path.write_text(lines[0] + "\n{\"question_id\": \"9\", \"text\n" + lines[1] + "\n")
  with pytest.raises(base.BenchmarkError, match="line 2 is not a valid JSON record"):
    _samples(tmp_path / "gqa", "gqa")
  bench, samples = _samples(tmp_path / "gqa", "gqa", skip_bad=True)
  assert [s.id for s in samples] == ["20968379", "20968380"]
  assert len(bench.report.skipped) == 1 and "line 2" in bench.report.skipped[0][2]


def test_mme_deeper_release_folder_and_prompt(tmp_path):
  fx._mme(str(tmp_path), "llava", deeper=True)  # pylint: disable=protected-access
  _, samples = _samples(tmp_path / "MME", "mme")
  assert len(samples) == 6
  first = next(s for s in samples if s.id == "existence/1.png#0")
  # lmms-eval drops MME's " Please answer yes or no." before the single-word instruction
  assert first.prompt == "Is there red?" + SINGLE


def test_seed_bench_llava_folder_is_found_by_all(tmp_path):
  fx.write(str(tmp_path), "seed", "llava")
  [(cls, folder)] = benchmarks.resolve("all", str(tmp_path))
  assert cls.name == "seed" and folder.endswith("seed_bench")


def test_mmbench_circular_copies_are_asked_once_and_grouped(tmp_path):
  perfect = fx.write(str(tmp_path), "mmbench", "llava")
  bench, samples = _samples(tmp_path / "mmbench", "mmbench")
  assert sorted(int(s.id) for s in samples) == [0, 1, 1_000_000, 1_000_001, 2_000_000,
                                                2_000_001, 3_000_000]
  question = next(s for s in samples if s.id == "1000001")
  assert question.prompt == ("A hint. Which is shown 1? There are several options:\n"
                             "A. dog\nB. bird\nC. cat\n" + base.OPTION_LETTER)
  assert question.target["answers"] == ["A"]
  records = [{"id": s.id, "prediction": perfect[s.id], "target": s.target} for s in samples]
  metrics = bench.score(records)
  assert (metrics["score"], metrics["num_questions"]) == (100.0, 2)
  wrong = [dict(r, prediction="A") if r["id"] == "2000001" else r for r in records]
  assert bench.score(wrong)["score"] == 50.0  # one copy wrong: the question is wrong
  [path] = bench.write_submission(records, str(tmp_path))
  sheet = openpyxl.load_workbook(path).active
  rows = list(sheet.values)
  header = rows[0]
  assert header[0] == "index" and header[-1] == "prediction"
  assert [r[0] for r in rows[1:]] == sorted(int(s.id) for s in samples)  # numbers
  assert [r[-1] for r in rows[1:]] == [perfect[str(r[0])] for r in rows[1:]]
  # an answer with control characters (a worksheet cannot hold them) is written cleaned
  records[0] = dict(records[0], prediction="\x12\x12oops")
  [path] = bench.write_submission(records, str(tmp_path))
  assert "oops" in [r[-1] for r in openpyxl.load_workbook(path).active.values]


def test_mmbench_copy_rows_may_point_at_the_image_of_their_question(tmp_path):
  perfect = fx.write(str(tmp_path), "mmbench", "llava")
  path = tmp_path / "mmbench" / "mmbench_dev_20230712.tsv"
  lines = path.read_text().splitlines()
  header = lines[0].split("\t")
  column = header.index("image")
  rows = [line.split("\t") for line in lines[1:]]
  for row in rows:
    if int(row[0]) >= mmbench.COPY_STRIDE:
      row[column] = str(int(row[0]) % mmbench.COPY_STRIDE)  # as MMBench's TSVs store it
  path.write_text("\n".join([lines[0]] + ["\t".join(r) for r in rows]) + "\n")
  _, samples = _samples(tmp_path / "mmbench", "mmbench")
  assert sorted(s.id for s in samples) == sorted(perfect)
  assert next(s for s in samples if s.id == "2000001").image == fx.png(1)


def test_mmbench_without_copies_is_rotated(tmp_path):
  rows = [r for r in fx._mmbench_rows(fx.MMBENCH_OPTIONS, [1, 1])  # pylint: disable=protected-access
          if r["index"] < mmbench.COPY_STRIDE]
  fx._mmbench_tsv(str(tmp_path / "mmbench" / "mmbench_dev_20230712.tsv"), rows)  # pylint: disable=protected-access
  _, samples = _samples(tmp_path / "mmbench", "mmbench")
  by_id = {s.id: s for s in samples}
  assert len(samples) == 7 and by_id["1000000"].target["answers"] == ["A"]
  assert by_id["1000000"].target["options"]["A"] == "green"


def test_mmbench_en_and_cn_side_by_side(tmp_path):
  folder = tmp_path / "mmbench"
  fx._mmbench_tsv(str(folder / "mmbench_dev_cn_20231003.tsv"),  # pylint: disable=protected-access
                  fx._mmbench_rows(fx.MMBENCH_OPTIONS, [1, 1], lang="cn"))  # pylint: disable=protected-access
  fx._mmbench_tsv(str(folder / "mmbench_dev_en_20231003.tsv"),  # pylint: disable=protected-access
                  fx._mmbench_rows(fx.MMBENCH_OPTIONS, [1, 1]))  # pylint: disable=protected-access
  _, samples = _samples(folder, "mmbench")
  assert all("Which is shown" in s.prompt for s in samples)
  _, samples = _samples(folder, "mmbench_cn")
  assert all("图中是什么" in s.prompt for s in samples)
  found = [cls.name for cls, _ in benchmarks.resolve("all", str(tmp_path))]
  assert found == ["mmbench", "mmbench_cn"]


def test_mmmu_prompt_places_the_first_tagged_image(tmp_path):
  d = tmp_path / "MMMU"
  fx._parquet(str(d / "validation-00000.parquet"), [  # pylint: disable=protected-access
      {"id": "validation_Art_1", "question": "Compare <image 2> and <image 1>.",
       "options": "['left', 'right']", "answer": "B", "question_type": "multiple-choice",
       "subfield": "Art", "image_1": fx._img(0), "image_2": fx._img(1)}])  # pylint: disable=protected-access
  [sample] = _samples(d, "mmmu")[1]
  assert sample.prompt == ("Compare <image> and .\nA. left\nB. right\n"
                           + mmmu.MULTI_CHOICE_PROMPT)
  assert sample.image == fx.png(1)


def test_vizwiz_question_is_capitalised(tmp_path):
  fx.write(str(tmp_path), "vizwiz", "llava")
  _, samples = _samples(tmp_path / "VizWiz", "vizwiz")
  assert samples[0].prompt.startswith("What is this 0?\nWhen the provided information")


def test_a_registered_benchmark_outside_the_paper_is_run_by_all(tmp_path):
  @base.register
  class Extra(base.Benchmark):  # pylint: disable=unused-variable
    name, title, folders = "extra_bench", "Extra", ("extra",)
  try:
    os.makedirs(tmp_path / "extra")
    fx.write(str(tmp_path), "pope", "llava")
    assert benchmarks.names()[-1] == "extra_bench"
    assert [c.name for c, _ in benchmarks.resolve("all", str(tmp_path))] == [
        "pope", "extra_bench"]
  finally:
    del base.REGISTRY["extra_bench"]


def test_an_inline_image_marker_stays_in_place_in_the_generation_prompt():
  # Training moves `<image>` to the front of its turn (data.image_position='front'), but
  # lmms-eval's LLaVA-family models keep a marker the task placed (MMMU's `<image k>`).
  from leo_mini_jax.data import conversation, tokenizers  # pylint: disable=import-outside-toplevel
  from leo_mini_jax.evaluation import generate  # pylint: disable=import-outside-toplevel
  tokenizer = tokenizers.ByteTokenizer()
  template = conversation.get_template("vicuna_v1", image_position="front")
  tokens = generate.build_prompt("Compare <image> and the text.", tokenizer, template, True)
  image_at = tokens.input_ids.index(conversation.IMAGE_PLACEHOLDER_ID)
  before = tokenizer.decode(tokens.input_ids[:image_at])
  assert before.endswith("USER: Compare "), before
  plain = generate.build_prompt("What is it?", tokenizer, template, True)
  assert tokenizer.decode(plain.input_ids[plain.input_ids.index(conversation.IMAGE_PLACEHOLDER_ID)
                                    + 1:]).startswith("\nWhat is it?")
