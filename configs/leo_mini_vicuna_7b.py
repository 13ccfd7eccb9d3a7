"""LEO-MINI-Vicuna-7B (paper §4.1): Vicuna-7B v1.5 + CLIP-L/14-336, ConvNeXt-XXL, SAM-L,
EVA-02-L and Pix2Struct-large (EAGLE-X5's experts, in its order).

  python train.py --config configs/leo_mini_vicuna_7b.py:stage=3,tokens=64 --workdir ... \
      --config.data.train_json=llava_v1_5_mix665k.json --config.data.image_root=DIR \
      --config.data.tokenizer=VICUNA_DIR --config.init_from=STAGE2_WORKDIR

Start stage 3 from an EAGLE-X5-7B release instead of running stages 1–2:
  python -m leo_mini_jax.porting.convert --config configs/leo_mini_vicuna_7b.py:stage=3 \
      --eagle /ckpt/Eagle-X5-7B --out /ckpt/leo_mini_vicuna_from_eagle
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return common.full_size_config(common.vicuna_7b_llm(), "vicuna_v1", arg, "vicuna_7b")
