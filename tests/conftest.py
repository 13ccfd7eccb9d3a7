"""Test-wide set-up: 4 fake CPU devices for mesh tests, and the `slow` marker.

XLA_FLAGS must be set before jax is imported anywhere, hence here. Tests that need one
device build their mesh from `jax.devices()[:1]`.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=4").strip()

import pytest  # noqa: E402


def pytest_addoption(parser):
  parser.addoption("--runslow", action="store_true", default=False,
                   help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
  if config.getoption("--runslow") or "slow" in (config.getoption("-m") or ""):
    return
  skip = pytest.mark.skip(reason="slow: run with --runslow")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)
