"""Every benchmark reader on tiny fixtures in both layouts, scored with right answers."""

import json
import os

import pytest

from leo_mini_jax.evaluation import benchmarks
from leo_mini_jax.evaluation.benchmarks import base
from tests.evaluation import benchmark_fixtures

# The score of all-correct predictions on each fixture (MME: perception points of two
# perception subtasks; OCRBench: points, one per question).
PERFECT = {"mme": 400.0, "ocrbench": 2}


def _read(tmp_path, name, layout, **kwargs):
  perfect = benchmark_fixtures.write(str(tmp_path), name, layout)
  [(cls, folder)] = benchmarks.resolve(name, str(tmp_path))
  bench = cls(folder, **kwargs)
  return bench, bench.samples(), perfect


@pytest.mark.parametrize("layout", ["llava", "parquet"])
@pytest.mark.parametrize("name", benchmarks.ORDER)
def test_reader_and_scorer_round_trip(tmp_path, name, layout):
  bench, samples, perfect = _read(tmp_path, name, layout)
  scored = {s.id for s in samples if "answers" in s.target}
  assert scored == set(perfect), (sorted(scored), sorted(perfect))
  for s in samples:
    assert s.image is not None and s.prompt
    # MMMU places the marker where its `<image k>` tag was; others leave it to the template.
    assert s.prompt.count("<image>") == (1 if name == "mmmu" else 0)
  records = [{"id": s.id, "prediction": perfect[s.id], "target": s.target}
             for s in samples if s.id in perfect]
  metrics = bench.score(records)
  assert metrics["score"] == pytest.approx(PERFECT.get(name, 100.0))
  wrong = [dict(r, prediction="zzz") for r in records]
  assert bench.score(wrong)["score"] < metrics["score"]


def test_prompts_carry_the_benchmark_instruction_once(tmp_path):
  _, samples, _ = _read(tmp_path, "textvqa", "llava")
  assert all(s.prompt.count(base.SINGLE_WORD) == 1 for s in samples)
  _, samples, _ = _read(tmp_path, "mmbench", "parquet")
  first = next(s for s in samples if s.id == "1")
  assert first.prompt == ("A hint. Which is shown 1? There are several options:\n"
                          "A. cat\nB. dog\nC. bird\n" + base.OPTION_LETTER)


def test_missing_image_and_malformed_record_are_named_or_skipped(tmp_path):
  benchmark_fixtures.write(str(tmp_path), "gqa", "llava")
  folder = tmp_path / "gqa"
  os.remove(folder / "data" / "images" / "n288871.jpg")
  with open(folder / "llava_gqa_testdev_balanced.jsonl", "a") as f:
    f.write(json.dumps({"question_id": "q3", "image": "n288870.jpg"}) + "\n")  # no 'text'
  with pytest.raises(base.BenchmarkError) as error:
    benchmarks.get("gqa")(str(folder)).samples()
  message = str(error.value)
  assert "GQA" in message and "llava_gqa_testdev_balanced.jsonl" in message
  assert "record 20968380" in message and "n288871.jpg" in message
  bench = benchmarks.get("gqa")(str(folder), skip_bad=True)
  samples = bench.samples()
  assert [s.id for s in samples] == ["20968379"]
  assert [record for _, record, _ in bench.report.skipped] == ["20968380", "q3"]
  assert "2 bad records skipped" in bench.report.summary()


def test_missing_annotation_file_names_it(tmp_path):
  benchmark_fixtures.write(str(tmp_path), "pope", "llava")
  os.remove(tmp_path / "pope" / "coco" / "coco_pope_random.json")
  with pytest.raises(base.BenchmarkError, match="POPE.*coco_pope_random.json"):
    benchmarks.get("pope")(str(tmp_path / "pope")).samples()


def test_resolve_all_and_unknown_names(tmp_path):
  for name in ("mme", "pope", "ocrbench"):
    benchmark_fixtures.write(str(tmp_path), name, "llava")
  found = [cls.name for cls, _ in benchmarks.resolve("all", str(tmp_path))]
  assert found == ["mme", "pope", "ocrbench"]  # the paper's column order
  with pytest.raises(base.BenchmarkError, match="unknown benchmark 'nope'"):
    benchmarks.resolve("nope", str(tmp_path))
  with pytest.raises(base.BenchmarkError, match="GQA: no folder"):
    benchmarks.resolve("gqa,mme", str(tmp_path))


def test_submission_files(tmp_path):
  bench, samples, _ = _read(tmp_path / "v", "vizwiz", "parquet")
  records = [{"id": s.id, "prediction": "Soup.", "target": s.target} for s in samples]
  [path] = bench.write_submission(records, str(tmp_path))
  with open(path) as f:
    assert json.load(f) == [{"image": "VizWiz_test_9.jpg", "answer": "soup"}]
