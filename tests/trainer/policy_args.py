"""Build a Policy from one flat keyword list (trainer section + grpo section + runtime args), as the
trainer tests and their torchrun workers do. fp32 unless told: the tests compare numbers with HF."""

from __future__ import annotations

import dataclasses

from sparrow_megatron.trainer.config import GRPOConfig, TrainerConfig

_TRAINER = {f.name for f in dataclasses.fields(TrainerConfig)}
_GRPO = {f.name for f in dataclasses.fields(GRPOConfig)}


def make_policy(model_dir, **kw):
    from sparrow_megatron.trainer.policy import Policy

    trainer = TrainerConfig(**{"dtype": "fp32", **{k: kw.pop(k) for k in list(kw) if k in _TRAINER}})
    grpo = GRPOConfig(**{k: kw.pop(k) for k in list(kw) if k in _GRPO})
    return Policy(trainer, grpo, model_dir=str(model_dir), **kw)
