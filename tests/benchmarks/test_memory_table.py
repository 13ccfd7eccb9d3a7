"""benchmarks.memory_table: which rows it compiles, how, and the table it writes."""

import json

import pytest

from benchmarks import memory_table

GIB = 2**30


def _row(accum, fits, devices=8, total=10 * GIB, **extra):
  row = {"target": "v5e:2x4", "device_kind": "TPU v5 lite", "memory": 16 * GIB,
         "devices": devices, "mesh": {"data": 1, "fsdp": devices, "tensor": 1},
         "stage": 3, "batch_size": 128, "grad_accum_steps": accum, "max_length": 2048,
         "remat_policy": "full", "params": 5 * GIB, "optimizer": GIB // 4,
         "batch": 2**20, "fits": fits}
  if fits:
    row.update(temp=total - 5 * GIB, total=total, peak=total - GIB)
  row.update(extra)
  return row


def test_rows_run_gpus_first_and_wide_slices_split_tensor():
  rows = memory_table.ordered(["llama3_8b-s3-*"])
  assert rows[:3] == ["llama3_8b-s3-h100x8", "llama3_8b-s3-h100x64", "llama3_8b-s3-v5e-8"]
  assert len(rows) == len(memory_table.SLICES)
  # 128 rows over 256 devices: each row's weights split over 2 more devices.
  assert memory_table.mesh_flag(256, 128) == "fsdp=128,tensor=2"
  assert memory_table.mesh_flag(256, 256) == "fsdp=-1"
  command = memory_table.scale_command("llama3_8b-s3-v5e-256", "x.jsonl")
  assert "--mesh=fsdp=128,tensor=2" in command and "--topology" in command
  assert "--config=configs/leo_mini_llama3_8b.py:stage=3" in command
  assert "--fit" in command and "--fit_start=1" in command
  assert not any(c.startswith("--fit_start")
                 for c in memory_table.scale_command("llama3_8b-s3-v5e-64", "x.jsonl"))
  assert "--fit_start=16" in memory_table.scale_command("vicuna_7b-s3-v5e-8", "x.jsonl")
  assert "--fit_start=1" in memory_table.scale_command("vicuna_7b-s3-h100x8", "x.jsonl")
  # The first matching guess wins: Vicuna's stages 1-2 before every v5p-8 row.
  assert "--fit_start=4" in memory_table.scale_command("vicuna_7b-s2-v5p-8", "x.jsonl")
  assert "--fit_start=2" in memory_table.scale_command("vicuna_7b-s3-v5p-8", "x.jsonl")
  assert "--fit_start=2" in memory_table.scale_command("llama3_8b-s1-v5p-8", "x.jsonl")


def test_summary_is_the_smallest_accumulation_that_fits_and_says_if_it_is_proven():
  tries = [_row(16, True), _row(8, True, total=14 * GIB), _row(4, False)]
  line = memory_table.summarise(tries)
  assert line["grad_accum_steps"] == 8 and line["verdict"] == "fits"
  line = memory_table.summarise(tries[:2])  # 4 never compiled
  assert line["grad_accum_steps"] == 8 and "not tried" in line["verdict"]
  assert memory_table.summarise([_row(1, True)])["verdict"] == "fits"  # nothing smaller


def test_summary_of_a_row_that_never_fits_reads_what_the_tpu_compiler_needed():
  error = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
           "HLO temporaries (29.71G) exceeds available HBM (15.75G).")
  line = memory_table.summarise([_row(16, False, error=error)])
  assert line["verdict"] == "does not fit at any accum"
  assert memory_table.needed_bytes(line) == ("temp", pytest.approx(29.71 * GIB))
  error = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. "
           "Ran out of memory in memory space hbm. Used 15.79G of 15.75G hbm. Exceeded hbm "
           "capacity by 41.57M.")
  assert memory_table.needed_bytes({"error": error}) == ("total", pytest.approx(15.79 * GIB))
  line = memory_table.summarise([_row(4, False)])
  assert line["verdict"] == "does not fit up to accum 4"


def test_table_from_results_into_docs(tmp_path):
  out = tmp_path / "rows"
  out.mkdir()
  with open(out / "llama3_8b-s3-v5e-8.jsonl", "w") as f:
    for row in (_row(16, True, total=13 * GIB), _row(8, False, error="required for HLO temporaries (17.5G) exceeds")):
      f.write(json.dumps(row) + "\n")
  with open(out / "llama3_8b-s2-v5e-8.jsonl", "w") as f:
    f.write(json.dumps(_row(16, False, error="required for HLO temporaries (29.7G) exceeds")) + "\n")
  # Compiled by a libtpu other than the installed one (TPU_LIBRARY_PATH): the verdict says so.
  with open(out / "llama3_8b-s1-v5e-8.jsonl", "w") as f:
    f.write(json.dumps(_row(16, True, compiler="libtpu 9.9.9")) + "\n")
  text = memory_table.table(str(out))
  lines = text.splitlines()
  assert lines[2].endswith("| fits (smaller accum not tried) (libtpu 9.9.9) |")
  del lines[2]
  assert lines[2] == ("| Llama-3-8B | 2 | v5e-8 | fsdp 8 | 16 | 5.0 | 0.2 | 29.7 needed | – | "
                      "– | 16.0 | does not fit at any accum |")
  assert lines[3] == ("| Llama-3-8B | 3 | v5e-8 | fsdp 8 | 16 | 5.0 | 0.2 | 8.0 | 12.0 "
                      "| 13.0 | 16.0 | fits |")
  assert memory_table.slice_label("h100x64", 64) == "64×H100"
  assert memory_table.stage_label(3, {"images_per_row": 4}) == "3 (packed, 4 images)"
  assert memory_table.stage_label(2, {"images_per_row": 1}) == "2"
  assert (memory_table.stage_label(3, {"images_per_row": 4, "vision_passes": 4})
          == "3 (packed, 4 images, 4 expert passes)")
  assert memory_table.slice_label("v5p-8", 4) == "v5p-8 (4 chips)"
  assert "Not compiled: h100x8 (all), h100x64 (all), v5e-8 (Vicuna-7B s1, "\
      "Vicuna-7B s2, Vicuna-7B s3), v5e-64 (all)" in text
  docs = tmp_path / "scale.md"
  docs.write_text(f"before\n{memory_table.DOCS_START}\nold\n{memory_table.DOCS_END}\nafter\n")
  memory_table.write_docs(str(docs), text)
  written = docs.read_text()
  assert written.startswith("before\n") and written.endswith("after\n")
  assert "old" not in written and lines[3] in written
