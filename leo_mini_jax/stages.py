"""The training stages as parameter-path rules (paper Table 6).

`config.schedule` is a list of (regex over the parameter path, group) pairs; the first
match wins, `None` means frozen, every path must match one rule. `stage_schedule(stage)`
gives a stage's rules; `STAGE_NEW_PARAMS[stage]` says which parameters that stage may
initialise fresh when it starts from the previous stage's checkpoint (`init_from`).

The optimizer (`training/optimizer.py`) builds its groups from these rules; config
checks (`config_validation.check_schedule`) accept the built-in rules even where an
expert set leaves one matching nothing. Neither imports the other for them.
"""

from typing import Any

from leo_mini_jax.models.vision import experts

# Table 6. Stage 3's new modules are CoTR ('reducer/...') and MMoE-LLM ('.../mmoe_...').
STAGE_SCHEDULES: dict[int, tuple[tuple[str, str | None], ...]] = {
    # Only the projector, as EAGLE's pre-training (model.requires_grad_(False), then
    # mm_projector): SAM's freshly initialised EAGLE neck stays frozen until stage 2.
    1: (("projector/.*", "main"), (".*", None)),
    2: ((".*", "main"),),
    3: (("projector/.*", "main"), ("reducer/.*", "main"), ("llm/.*/mmoe_.*", "main"),
        (".*", None)),
}
# The experts' parameters that are new on top of their checkpoints (the registry's
# `fresh`, `models/vision/experts.py`): SAM's EAGLE neck, as EAGLE initialises it.
_EXPERTS_FRESH = experts.fresh_params()
# Optional stage-1 rule (`stage_schedule(1, train_sam_neck=True)`): also train SAM's new
# EAGLE neck, so the projector does not learn on the output of a random 1×1 conv.
SAM_NECK_RULE = (_EXPERTS_FRESH, "main")
# What a stage may initialise fresh when it starts from the previous stage's checkpoint.
STAGE_NEW_PARAMS = {1: r"(projector|reducer)/.*|" + _EXPERTS_FRESH, 2: r"$^",
                    3: r"(reducer/.*|llm/.*/mmoe_.*)"}


def stage_schedule(stage: int, train_sam_neck: bool = False) -> list[list[Any]]:
  """`config.schedule` of a stage (Table 6); train_sam_neck adds SAM_NECK_RULE in stage 1
  (later stages train the neck anyway)."""
  rules = [list(rule) for rule in STAGE_SCHEDULES[stage]]
  if train_sam_neck and stage == 1:
    rules.insert(0, list(SAM_NECK_RULE))
  return rules


def builtin_rules() -> list[tuple[str, str | None]]:
  """Every built-in rule of every stage, SAM_NECK_RULE included: rules that name modules
  only some expert sets have, so they may match nothing."""
  return [rule for rules in STAGE_SCHEDULES.values() for rule in rules] + [SAM_NECK_RULE]
