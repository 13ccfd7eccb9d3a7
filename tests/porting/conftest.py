"""What the port tests share: float32 references at the highest matmul precision, the
reference libraries (the test module is skipped without them) and the randomiser that
sets a torch model's parameters to noise."""

import jax
import pytest


@pytest.fixture(autouse=True)
def _highest_matmul_precision():
  """float32 references: keep GPUs/TPUs from running f32 matmuls in TF32/bfloat16."""
  with jax.default_matmul_precision("highest"):
    yield


def reference_libraries(*names):
  """The named modules; the calling test module is skipped when one is not installed."""
  return tuple(pytest.importorskip(name) for name in names)


def randomize_(model, seed=0, scale=0.2, norm_suffix="weight"):
  """Every parameter of a torch module to noise, in place; returns it in eval mode.

  The references initialise norms to 1, biases to 0 and layer scales near 0, which would
  hide a skipped or transposed tensor. Norm parameters (a name holding 'norm' and ending
  in `norm_suffix`; '' for all of them) get 1 + noise, the rest noise, `scale`·N(0, 1).
  """
  import torch  # pylint: disable=import-outside-toplevel
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      base = 1.0 if "norm" in name and name.endswith(norm_suffix) else 0.0
      p.copy_(base + scale * torch.randn(p.shape, generator=gen))
  return model.eval()
