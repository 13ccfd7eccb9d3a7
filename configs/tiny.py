"""Tiny LEO-MINI for CPU: the embedded default (synthetic VQA, a few minutes per stage).

  python train.py --config configs/tiny.py:stage=3,tokens=16 --workdir /tmp/tiny3

arg knobs: stage (1, 2, 3), tokens (N^V for stage 3), reducer ('cotr', 'mqt'; stages 1–2
always use 'none', EAGLE's fusion), router ('multimodal', 'hidden' = vanilla LoRA-MoE).
"""

import ml_collections

from configs import common


def get_model_config(stage: int, tokens: int, reducer: str, router: str) -> dict:
  cotr_stage = stage == 3
  return dict(
      llm=dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=2,
               num_heads=4, num_kv_heads=2, rope_theta=10000.0, max_position_embeddings=512,
               tie_embeddings=False, mmoe=dict(common.mmoe_config(cotr_stage, router),
                                               rank=8, router_hidden_dim=32)),
      experts=[
          dict(name="clip", image_size=32, patch_size=8, hidden_size=32,
               intermediate_size=64, num_layers=2, num_heads=2, cls_token="drop"),
          dict(name="convnext", image_size=64, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)),
      ],
      reducer=dict(kind=reducer if cotr_stage else "none", num_visual_tokens=tokens,
                   cotr_dim=32, grid_size=4, mqt_heads=2),
  )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, stage=3, tokens=4, reducer="cotr", router="multimodal")
  config = ml_collections.ConfigDict()
  config.stage = arg.stage
  config.seed = 0
  config.model = get_model_config(arg.stage, arg.tokens, arg.reducer, arg.router)
  return config
