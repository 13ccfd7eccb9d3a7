"""LEO-MINI-Llama3-8B shapes (paper §4.1): Llama-3-8B + CLIP-L/14-336 + ConvNeXt-XXL.

The paper's Llama-3 variant also uses Pix2Struct and EVA-02; they join
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
  config.model = common.full_size_model(common.llama3_8b_llm(), arg.stage, arg.tokens,
                                        arg.reducer, arg.router)
  return config
