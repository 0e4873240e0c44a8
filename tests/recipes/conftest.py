"""Session fixtures of the recipe rehearsal: the user's checkpoint, their dataset files, one engine.

The engine is what a cluster job's rollout group is: a running SGLang server with the `sparrow`
backend (LoRA capacity on, for DistillSparse) that `sparrow train` attaches to through `rollout.urls`,
as the trainer group does on Slurm. Sharing it keeps the rehearsal of every recipe to one engine start.
"""

from __future__ import annotations

import pytest

from tests.recipes import fixtures


@pytest.fixture(scope="session")
def user_files(tmp_path_factory):
    """{name: path}: the tiny Qwen3 dir and one file per public dataset format."""
    root = tmp_path_factory.mktemp("user")
    return {
        "model": fixtures.make_user_qwen3(root / "Qwen3-tiny"),
        "dapo": fixtures.write_dapo_parquet(root / "dapo-math-17k.parquet"),
        "polaris": fixtures.write_polaris_jsonl(root / "polaris.jsonl"),
        "aime": fixtures.write_aime_jsonl(root / "aime24.jsonl"),
        "taco": fixtures.write_taco_jsonl(root / "taco.jsonl"),
        "lcb": fixtures.write_livecodebench_jsonl(root / "livecodebench.jsonl"),
    }


@pytest.fixture(scope="session")
def engine(user_files, tmp_path_factory):
    """A running engine on the user's checkpoint: (fleet, base URL)."""
    from sparrow_megatron.rollout.config import FleetOptions, LoraServerConfig, RolloutConfig
    from sparrow_megatron.rollout.fleet import RolloutFleet
    from sparrow_megatron.trainer.config import ALL_LINEAR

    options = FleetOptions(
        model_path=str(user_files["model"]),
        run_dir=str(tmp_path_factory.mktemp("engine")),
        lora=LoraServerConfig(max_rank=16, target_modules=tuple(ALL_LINEAR)),
        health_interval_s=0,
        startup_timeout_s=900,  # a shared 2-core machine under load can take minutes
    )
    with RolloutFleet(RolloutConfig(engines=1), options) as fleet:
        yield fleet, fleet.urls[0]


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory):
    """One sqlite MLflow store for every rehearsal (creating one runs MLflow's migrations)."""
    return tmp_path_factory.mktemp("mlflow_store") / "mlflow.db"
