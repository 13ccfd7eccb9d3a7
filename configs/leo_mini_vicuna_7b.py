"""LEO-MINI-Vicuna-7B shapes (paper §4.1): Vicuna-7B v1.5 + CLIP-L/14-336 + ConvNeXt-XXL.

The paper's Vicuna variant also uses Pix2Struct, EVA-02 and SAM; they join
`common.full_size_model` once their expert modules are registered
(models/vision/experts.py).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, stage=3, tokens=64, reducer="cotr", router="multimodal")
  config = ml_collections.ConfigDict()
  config.stage = arg.stage
  config.seed = 0
  config.model = common.full_size_model(common.vicuna_7b_llm(), arg.stage, arg.tokens,
                                        arg.reducer, arg.router)
  return config
