"""A job config (`recipe() -> JobConfig`) as a `LaunchSpec`: the rollout group runs `sparrow serve` on
each rollout node, the trainer group `sparrow train` with the same recipe and overrides, attached to
those engines through the env contract (`rollout.urls=env`)."""

from __future__ import annotations

import importlib.util
import json
import shlex
from pathlib import Path

from sparrow_megatron.config import JobConfig
from sparrow_megatron.errors import UserError
from sparrow_megatron.launch.spec import LaunchSpec, RolloutGroupConfig, SlurmSettings, TrainerGroupConfig

# The node's own address, filled in on the node by the task wrapper (launch/task.py).
NODE_ADDR = "${SPARROW_NODE_ADDR}"


def is_job_recipe(source: str) -> bool:
    """A YAML/JSON job config, or a .py file defining `recipe()` (and not a LaunchSpec's SPEC/spec())."""
    if source.endswith((".yaml", ".yml", ".json")):
        return True
    if not source.endswith(".py") or not Path(source).is_file():
        return False
    module_spec = importlib.util.spec_from_file_location(f"_sparrow_probe_{Path(source).stem}", source)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception:
        return False  # the real loader reports the import error with context
    return (
        callable(getattr(module, "recipe", None))
        and not hasattr(module, "SPEC")
        and not hasattr(module, "spec")
    )


def model_dir(cfg: JobConfig) -> Path:
    if cfg.model.hf_dir:
        return Path(cfg.model.hf_dir).expanduser().absolute()
    from sparrow_megatron.data.recall import TINY_RECALL_DIR  # the embedded tiny Qwen3

    return TINY_RECALL_DIR


def launch_spec(cfg: JobConfig, recipe: str, overrides: list[str]) -> LaunchSpec:
    """The het job of a validated JobConfig. `recipe` and `overrides` are what the trainer re-loads on
    its node (so it runs exactly the submitted config); the run dir is made absolute for the nodes."""
    c, r = cfg.cluster, cfg.rollout
    local = c.executor == "local"
    if not local and (c.rollout_nodes < 1 or c.trainer_nodes < 1):
        raise UserError(
            f"field 'cluster.rollout_nodes': a Slurm job needs rollout and trainer nodes, got "
            f"{c.rollout_nodes} of cluster.nodes={c.nodes}"
        )
    run_dir = Path(cfg.loop.run_dir).expanduser().absolute()
    engines_per_node = r.engines // max(c.rollout_nodes, 1)
    cli = [c.python, "-m", "sparrow_megatron.cli.main"]
    rollout_cmd = [
        *cli, "serve",
        "--model", str(model_dir(cfg)),
        "--engines", str(engines_per_node),
        "--tp", str(r.engine_tp),
        "--port-base", str(c.engine_base_port), "--exact-ports",
        "--host", NODE_ADDR,
        "--attention-backend", r.attention_backend,
        "--seed", str(cfg.loop.seed),
        "--startup-timeout", str(c.rollout_start_timeout_s),
        "--run-dir", f"{run_dir}/engines/node${{SPARROW_NODE_RANK}}",
    ]  # fmt: skip
    if r.schedule != "dense":
        rollout_cmd += ["--schedule", r.schedule]
    if r.kv_pool_tokens:
        rollout_cmd += ["--kv-pool-tokens", str(r.kv_pool_tokens)]
    if r.server_args:  # one word, so that a flag-like value is not read as a `sparrow serve` option
        rollout_cmd += [f"--server-args={shlex.join(r.server_args)}"]
    if cfg.distill.enabled:  # the engines must accept the adapter DistillSparse trains and loads each step
        rollout_cmd += ["--lora-rank", str(cfg.distill.rank)]
        rollout_cmd += ["--lora-target-modules", ",".join(cfg.distill.target_modules)]
    attach = ["rollout.urls=env"]
    if local:
        # One machine: `sparrow train` launches and stops its own engines, as without NeMo-Run (a
        # separate `sparrow serve` would never exit and keep the local experiment running).
        rollout_cmd = [c.python, "-c", "print('sparrow: local run: the trainer launches its own engines')"]
        attach = []
    # The trainer starts in NeMo-Run's code dir, not the submit dir: every path it reads goes absolute.
    paths = {"model.hf_dir": cfg.model.hf_dir, "data.train_path": cfg.data.train_path,
             "data.eval_path": cfg.data.eval_path}  # fmt: skip
    absolute = [f"{key}={Path(value).expanduser().absolute()}" for key, value in paths.items() if value]
    if cfg.data.eval:  # JSON is a YAML flow mapping: the override parser reads it back as the dict
        sets = {name: str(Path(path).expanduser().absolute()) for name, path in cfg.data.eval.items()}
        absolute.append(f"data.eval={json.dumps(sets)}")
    trainer_cmd = [
        *cli, "train", str(Path(recipe).absolute()), *overrides, *absolute,
        *attach, f"loop.run_dir={run_dir}",
    ]  # fmt: skip
    return LaunchSpec(
        name=cfg.name,
        rollout_cmd=rollout_cmd,
        trainer_cmd=trainer_cmd,
        rollout=RolloutGroupConfig(
            nodes=max(c.rollout_nodes, 1),
            gpus_per_node=c.gpus_per_node,
            engine_tp=r.engine_tp,
            engine_base_port=c.engine_base_port,
            router_port=c.engine_base_port - 1,  # no router: the trainer routes (rollout/fleet.py)
            engines_per_node=engines_per_node,
        ),
        trainer=TrainerGroupConfig(
            nodes=1 if local else c.trainer_nodes,
            gpus_per_node=c.gpus_per_node,
            tp=cfg.trainer.tp,
            pp=cfg.trainer.pp,
            procs_per_node=None if c.gpus_per_node else 1,  # CPU nodes: one gloo process
            rdzv_port=c.rdzv_port,
            launcher="torchrun",
        ),
        cluster=SlurmSettings(
            account=c.account or ("local" if local else ""),  # no sbatch, no account needed
            partition=c.partition or None,
            time_limit=c.time_limit,
            container_image=c.container_image or None,
            container_mounts=list(c.container_mounts),
            job_dir=c.job_dir,
            env=dict(c.env),
            python=c.python,
            requeue_signal_s=c.requeue_signal_s,
            max_retries=c.max_retries,
        ),
        run_dir=str(run_dir),
        mlflow_uri=cfg.tracking.mlflow_uri or None,
        executor=c.executor,
    )
