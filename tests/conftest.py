"""Test-wide set-up: 4 fake CPU devices for mesh tests, unoptimised XLA:CPU code, one XLA
compilation cache per session, the `slow` marker, and a tiny trained stage-3 run that
several tests share.

XLA_FLAGS and the cache variables must be set before jax is imported anywhere, hence
here. Tests that need one device build their mesh from `jax.devices()[:1]`.
"""

import collections
import os
import shutil
import tempfile

# Tests compile hundreds of small programs and run most of them a few times, so LLVM's
# optimisation of XLA:CPU's code costs more than it saves: at level 0 the tiny model's
# init compiles in 6 s instead of 29 s, and the model and step tests take half as long.
# Nothing a test asserts depends on it (the long trainings run ~15% slower).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=4"
                           + " --xla_backend_optimization_level=0").strip()

# Many tests build the same program from a fresh TrainSetup or model (the tiny train step,
# forward, generation buckets), and jit's in-memory cache is keyed by the Python function,
# so each would compile again. A persistent cache is keyed by the program itself: the
# second build loads the executable. The train.py / eval.py / ask subprocesses inherit the
# variables and share it. A new directory each session, removed at the end, so nothing
# compiled by an earlier run (or by other code) is ever loaded.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE = tempfile.mkdtemp(prefix="leo_mini_tests_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

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


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """After each test module: drop jit's in-memory executables and collect garbage.

  One process runs ~600 tests; without this it holds every executable and every dropped
  iterator until the session ends (10 GB RSS by the end), and objects with finalizers
  (grain iterators, orbax managers) are collected at arbitrary points in later tests.
  Programs built again later load from the session's persistent compilation cache.
  """
  yield
  import gc  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  jax.clear_caches()
  gc.collect()


TrainedRun = collections.namedtuple("TrainedRun", "config workdir state mesh")


@pytest.fixture(scope="session")
def stage3_run(tmp_path_factory):
  """The tiny stage-3 model trained 4 steps, saved at every step (keep 5), on one device.

  Trained once per session for every test that needs a real run: the ask CLI and
  eval.py read its checkpoint, the broken-checkpoint tests corrupt copies of it. Treat
  the workdir as read-only (copy it to write); `state` is the final train state on host.
  The config is `small_config(3)` unchanged, so its train step is the one other training
  tests compile (loaded from the session's compilation cache after the first).
  """
  import jax  # pylint: disable=import-outside-toplevel
  from leo_mini_jax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from leo_mini_jax.training import loop  # pylint: disable=import-outside-toplevel
  from tests.training.conftest import small_config  # pylint: disable=import-outside-toplevel
  config = small_config(3, **{"checkpoint.every_steps": 1, "checkpoint.keep": 5})
  workdir = str(tmp_path_factory.mktemp("stage3_run") / "run")
  mesh = mesh_lib.make_mesh(dict(data=1), devices=jax.devices()[:1])
  summary = loop.train(config, workdir, progress=False, mesh=mesh)
  return TrainedRun(config, workdir, jax.device_get(summary["state"]), mesh)
