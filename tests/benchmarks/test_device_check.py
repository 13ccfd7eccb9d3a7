"""benchmarks/device_check.py --dry_run: every check runs at toy sizes and passes."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import device_check  # noqa: E402


def test_dry_run_runs_every_check_and_passes():
  rows = device_check.run_checks(dry_run=True)
  assert [r["check"] for r in rows] == ["train_tiny", "attention_parity", "llm_1b_step",
                                        "decode"]
  assert all(r["ok"] for r in rows), rows
  loss = rows[0]["detail"].split("loss ")[1].split(" in")[0].split(" -> ")
  assert float(loss[1]) < float(loss[0])
  assert "padded XLA vs XLA, T=67" in rows[1]["detail"]  # odd length, the padded path
  assert "MFU" in rows[2]["detail"] and "tokens/s" in rows[3]["detail"]
  table = device_check.format_table(rows)
  assert table.count("\n") == len(rows) + 1 and " NO " not in table
