"""The Sparrow RL loop: one readable function, one step = the data flow of the design.

    prompts -> sparse rollout (fleet) -> rewards -> dense score + top-K (trainer) -> mismatch tails
      -> GRPO update with TIS -> weight sync -> (controller adjusts the schedule) -> log, checkpoint

Runs the trainer in this process (world size 1 on CPU, or one rank of a torchrun job) and drives a
fleet of SGLang engines it launches or attaches to.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparrow_megatron.config import JobConfig, validate
from sparrow_megatron.errors import UserError
from sparrow_megatron.loop.controller import BudgetController
from sparrow_megatron.loop.monitor import TailMonitor
from sparrow_megatron.loop.rundir import RunDir
from sparrow_megatron.loop.tasks import Prompt, make_task
from sparrow_megatron.loop.tracking import MlflowTracker
from sparrow_megatron.rollout.config import RolloutConfig as FleetConfig
from sparrow_megatron.rollout.fleet import RolloutFleet
from sparrow_megatron.rollout.types import Sample, SamplingParams, topk_tensors
from sparrow_megatron.sparsity.schedule import Schedule, resolve_schedule
from sparrow_megatron.trainer.batch import RolloutBatch
from sparrow_megatron.trainer.config import TrainerConfig
from sparrow_megatron.trainer.grpo import group_advantages

log = logging.getLogger("sparrow.loop")


@dataclass
class StepResult:
    step: int
    metrics: dict[str, float]
    schedule: Schedule | None


@dataclass
class RunSummary:
    run_dir: Path
    steps: list[StepResult] = field(default_factory=list)
    mlflow_uri: str = ""
    ui_command: str = ""
    throughput: dict[str, float] = field(default_factory=dict)


def trainer_config(cfg: JobConfig, model_dir: Path) -> TrainerConfig:
    t, g = cfg.trainer, cfg.grpo
    return TrainerConfig(
        model_dir=str(model_dir), tp=t.tp, pp=t.pp, micro_batch_tokens=t.micro_batch_tokens,
        params_dtype="bfloat16" if t.dtype == "bf16" else "float32", lr=t.lr, warmup_steps=t.warmup_steps,
        lr_schedule=t.lr_schedule, total_steps=cfg.loop.steps, weight_decay=t.weight_decay, grad_clip=t.grad_clip,
        eps_low=g.eps_low, eps_high=g.eps_high, dual_clip=g.dual_clip, tis_cap=g.tis_cap, kl_coef=g.kl_coef,
        loss_agg=g.loss_agg, adv_eps=g.adv_eps, temperature=cfg.rollout.temperature,
        top_k_logprobs=cfg.rollout.top_k_logprobs, seed=cfg.loop.seed,
    )  # fmt: skip


def fleet_config(cfg: JobConfig, model_dir: Path, run_dir: RunDir) -> FleetConfig:
    r = cfg.rollout
    return FleetConfig(
        model_path=str(model_dir), engines=r.engines, tp_size=r.engine_tp, attention_backend=r.attention_backend,
        top_logprobs=r.top_k_logprobs, request_timeout_s=r.timeout_s, random_seed=cfg.loop.seed,
        run_dir=str(run_dir.root / "engines"),
    )  # fmt: skip


def resolve_model_dir(cfg: JobConfig, run_dir: RunDir) -> Path:
    if cfg.model.hf_dir:
        return Path(cfg.model.hf_dir)
    from sparrow_megatron.data.pretrain_recall import embedded_checkpoint

    return embedded_checkpoint()


def to_trainer_batch(samples: list[Sample], rewards: list[float], group_ids: list[int], adv_eps: float):
    advantages = group_advantages(rewards, group_ids, eps=adv_eps)
    return RolloutBatch(
        prompt_ids=[s.prompt_ids for s in samples],
        response_ids=[s.output_ids for s in samples],
        rollout_logprobs=[s.logprobs for s in samples],
        advantages=advantages.tolist(),
    )


def usable(samples: list[Sample]) -> tuple[list[Sample], int]:
    """Samples the update can use: a response, finite log-probs. The others are counted and logged."""
    keep = [s for s in samples if s.output_ids and np.isfinite(s.logprobs).all()]
    return keep, len(samples) - len(keep)


class Loop:
    def __init__(self, cfg: JobConfig, resume: bool = False):
        validate(cfg)
        if cfg.distill.enabled:
            raise UserError("field 'distill.enabled': DistillSparse is not available in this version yet")
        self.cfg = cfg
        self.run = RunDir(cfg.run_dir)
        if self.run.exists() and not resume and self.run.read_metrics():
            raise UserError(f"{cfg.run_dir} already holds a run: pass --resume to continue it, or another run_dir")
        self.run.create(cfg)
        self.model_dir = resolve_model_dir(cfg, self.run)

    def train(self) -> RunSummary:
        from sparrow_megatron.data.datasets import load_tokenizer
        from sparrow_megatron.trainer.policy import Policy

        cfg = self.cfg
        tokenizer = load_tokenizer(self.model_dir)
        task = make_task(cfg, tokenizer)
        schedule = resolve_schedule(cfg.rollout.schedule)
        monitor = TailMonitor(cfg.monitor)
        controller = (
            BudgetController(cfg.monitor.controller, cfg.monitor.tau, schedule)
            if cfg.monitor.controller.enabled
            else None
        )
        policy = Policy(trainer_config(cfg, self.model_dir))
        start = 0
        checkpoint = self.run.last_complete_checkpoint()
        if checkpoint is not None:
            state = policy.load_checkpoint(checkpoint.path / "policy")
            loop_state = RunDir.read_loop_state(checkpoint.path)
            start = loop_state["next_step"]
            monitor.load_state_dict(loop_state["monitor"])
            if controller is not None:
                controller.load_state_dict(loop_state["controller"])
                schedule = controller.schedule
            self.run.truncate_metrics(keep_through=start - 1)
            log.info("resumed from %s at step %d (trainer step %s)", checkpoint.path, start, state.get("step"))
        summary = RunSummary(run_dir=self.run.root)
        sampling = SamplingParams(
            temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, max_new_tokens=cfg.data.max_response_tokens
        )
        with MlflowTracker.from_config(cfg) as tracker, RolloutFleet(fleet_config(cfg, self.model_dir, self.run)) as fleet:
            tracker.start(params=cfg.to_flat_dict(), resume=start > 0)
            summary.mlflow_uri, summary.ui_command = cfg.mlflow_uri, tracker.ui_command()
            if start > 0:  # the engines start from the base checkpoint: give them the resumed weights
                fleet.sync_weights(policy.iter_hf_weights())
            progress = _progress(cfg.loop.steps, start)
            for step in range(start, cfg.loop.steps):
                t0 = time.perf_counter()
                prompts = task.prompts("train", step * cfg.loop.prompts_per_step, cfg.loop.prompts_per_step)
                prompt_ids = [tokenizer(p.text, add_special_tokens=False)["input_ids"] for p in prompts]
                rollout = fleet.generate(
                    prompt_ids, _seeded(sampling, cfg.loop.seed, step), n=cfg.rollout.n_samples, schedule=schedule
                )
                samples, dropped = usable(rollout.flat())
                rewards = [
                    task.reward(prompts[s.prompt_index], tokenizer.decode(s.output_ids, skip_special_tokens=False))
                    for s in samples
                ]
                batch = to_trainer_batch(
                    samples, rewards, [prompts[s.prompt_index].index for s in samples], cfg.grpo.adv_eps
                )
                score = policy.score(batch)
                batch.old_logprobs = score.logprobs
                tails = monitor.observe_topk(
                    step,
                    torch.cat(score.topk_ids),
                    torch.cat(score.topk_logprobs).double(),
                    *map(torch.cat, zip(*(topk_tensors(s, cfg.rollout.top_k_logprobs) for s in samples), strict=True)),
                    np.concatenate([len(s.prompt_ids) + np.arange(s.response_len) for s in samples]),
                )
                metrics = {f"train/{k}": v for k, v in policy.train_step(batch).items()}
                fleet.sync_weights(policy.iter_hf_weights())
                metrics.update(
                    {
                        "reward/mean": float(np.mean(rewards)) if rewards else 0.0,
                        "rollout/response_len": float(np.mean([s.response_len for s in samples])),
                        "rollout/tokens_per_s": rollout.tokens_per_s,
                        "rollout/dropped_samples": float(dropped),
                        "rollout/weight_version": float(fleet.weight_version),
                        "time/step_s": time.perf_counter() - t0,
                        **tails.metrics(),
                    }
                )
                if schedule is not None:
                    metrics["schedule/mean_budget"] = float(np.mean([b or 0 for b in schedule.budgets]))
                if controller is not None:
                    schedule, changes = controller.update(step, tails.p5_by_bin(), cfg.monitor.bin_width)
                    for change in changes:
                        log.warning("schedule change at step %d: %s", step, change.to_dict())
                    if changes:
                        tracker.log_schedule(schedule, step)
                self.run.append_metrics(step, metrics)
                tracker.log_metrics(step, metrics)
                summary.steps.append(StepResult(step, metrics, schedule))
                progress.update(step, metrics)
                every = cfg.loop.checkpoint_every
                if (every and (step + 1) % every == 0) or step + 1 == cfg.loop.steps:
                    self._checkpoint(policy, step, monitor, controller)
            progress.close()
            summary.throughput = _measure_throughput(fleet, task, tokenizer, cfg, schedule)
            self._finish(policy, monitor, tracker, summary)
        return summary

    def _checkpoint(self, policy, step: int, monitor: TailMonitor, controller: BudgetController | None) -> None:
        path = self.run.begin_checkpoint(step)
        policy.save_checkpoint(path / "policy", step=step + 1)
        state: dict[str, Any] = {"next_step": step + 1, "monitor": monitor.state_dict()}
        if controller is not None:
            state["controller"] = controller.state_dict()
        RunDir.write_loop_state(path, state)
        self.run.commit_checkpoint(step)

    def _finish(self, policy, monitor: TailMonitor, tracker: MlflowTracker, summary: RunSummary) -> None:
        from sparrow_megatron.loop.plots import plot_rewards, plot_tail_heatmap

        plots = self.run.plots
        steps, starts, matrix = monitor.heatmap("p5")
        artifacts = [
            plot_tail_heatmap(plots / "tail_p5_heatmap.png", steps, starts, matrix, self.cfg.monitor.tau,
                              self.cfg.monitor.bin_width),
        ]  # fmt: skip
        rows = self.run.read_metrics()
        artifacts.append(
            plot_rewards(plots / "reward.png", [r["step"] for r in rows], {"reward": [r["reward/mean"] for r in rows]})
        )
        tracker.log_artifacts(artifacts, "plots")
        final = self.run.root / "final_hf"
        shutil.rmtree(final, ignore_errors=True)
        policy.export_hf(final)
        tracker.log_artifact(final, "final_hf")


def _seeded(sampling: SamplingParams, seed: int, step: int) -> SamplingParams:
    """Per-step sampling seed: a resumed run draws the same tokens as an uninterrupted one."""
    from dataclasses import replace

    return replace(sampling, seed=seed * 1_000_003 + step * 7919)


def _measure_throughput(fleet, task, tokenizer, cfg: JobConfig, schedule) -> dict[str, float]:
    """Rollout tokens/s of the same eval prompts, dense and with the schedule, on this machine."""
    prompts: list[Prompt] = task.prompts("eval", 0, max(cfg.loop.prompts_per_step, 1))
    ids = [tokenizer(p.text, add_special_tokens=False)["input_ids"] for p in prompts]
    sampling = SamplingParams(temperature=0.0, max_new_tokens=cfg.data.max_response_tokens)
    out = {}
    for name, sched in (("dense", None), ("sparse", schedule)):
        if name == "sparse" and sched is None:
            continue
        batch = fleet.generate(ids, sampling, n=cfg.rollout.n_samples, schedule=sched)
        rewards = [task.reward(prompts[s.prompt_index], tokenizer.decode(s.output_ids)) for s in batch.flat()]
        out[f"{name}_tokens_per_s"] = batch.tokens_per_s
        out[f"{name}_greedy_reward"] = float(np.mean(rewards))
    return out


class _progress:
    """A rich progress bar with the numbers people watch: reward, worst p5, throughput."""

    def __init__(self, total: int, start: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(
            TextColumn("[bold]RL"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
        )  # fmt: skip
        self.task = self.bar.add_task("steps", total=total, completed=start, info="")
        self.bar.start()

    def update(self, step: int, metrics: dict[str, float]) -> None:
        p5 = metrics.get("tail/p5_min")
        info = f"reward {metrics['reward/mean']:.3f}  p5 {'n/a' if p5 is None else f'{p5:.3f}'}  " \
               f"{metrics['rollout/tokens_per_s']:.0f} tok/s"
        self.bar.update(self.task, completed=step + 1, info=info)

    def close(self) -> None:
        self.bar.stop()
