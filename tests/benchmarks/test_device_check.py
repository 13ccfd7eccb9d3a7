"""benchmarks.device_check --dry_run: every check runs at toy sizes and passes."""

import pytest

from benchmarks import device_check


def test_dry_run_attention_llm_step_and_decode():
  parity = device_check.attention_parity(dry_run=True)
  assert parity["ok"], parity
  assert "padded XLA vs XLA, T=67" in parity["detail"]  # odd length, the padded path
  cfg, model, params = device_check._llm(dry_run=True)
  step = device_check.llm_step(True, cfg, model, params)
  decode = device_check.decode_speed(True, cfg, model, params)
  assert step["ok"] and "MFU" in step["detail"], step
  assert decode["ok"] and "tokens/s" in decode["detail"], decode
  table = device_check.format_table([parity, step, decode])
  assert table.count("\n") == 4 and " NO " not in table


@pytest.mark.slow
def test_dry_run_runs_every_check_and_the_tiny_loss_falls():
  rows = device_check.run_checks(dry_run=True)
  assert [r["check"] for r in rows] == ["train_tiny", "attention_parity", "llm_1b_step",
                                        "decode"]
  assert all(r["ok"] for r in rows), rows
  loss = rows[0]["detail"].split("loss ")[1].split(" in")[0].split(" -> ")
  assert float(loss[1]) < float(loss[0])
