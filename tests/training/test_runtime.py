"""The model runtime (eval, ask, convert) and the TrainSetup built on it agree."""

import jax
import numpy as np
import pytest

from leo_mini_jax import runtime
from leo_mini_jax.training import loop
from tests.training.conftest import small_config


def test_runtime_has_no_training_state_and_trainsetup_extends_it(one_device_mesh):
  config = small_config(2)
  model_runtime = runtime.ModelRuntime(config, one_device_mesh)
  for training_only in ("tx", "state_shardings", "abstract_state", "jit_train_step"):
    assert not hasattr(model_runtime, training_only)
  setup = loop.TrainSetup(config, one_device_mesh)
  assert isinstance(setup, runtime.ModelRuntime)
  assert setup.param_shardings == setup.state_shardings.params
  assert jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding),
                      model_runtime.abstract_params) == jax.tree.map(
      lambda x: (x.shape, x.dtype, x.sharding), setup.abstract_state.params)
  # The runtime's init is the train state's params at the same seed.
  got = jax.device_get(model_runtime.init_params(3))
  want = jax.device_get(setup.init_state(3).params)
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_runtime_checks_the_schedule(one_device_mesh):
  config = small_config(2)
  config.schedule = [(r"nothing/.*", "projector")] + list(config.schedule)
  with pytest.raises(ValueError, match=r"config.schedule\[0\]"):
    runtime.ModelRuntime(config, one_device_mesh)


def test_one_validator_checks_the_optimizer_fields():
  from leo_mini_jax import config_validation  # pylint: disable=import-outside-toplevel
  config = small_config(1)
  config.optimizer.decay = "linear"
  with pytest.raises(config_validation.ConfigError, match="config.optimizer.decay"):
    config_validation.validate_config(config, device_count=0, trace_model=False)
