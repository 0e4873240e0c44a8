"""The Sparrow RL loop: one readable function, one step = the data flow of the design.

    prompts -> sparse rollout (fleet) -> rewards -> dense score + top-K (trainer) -> mismatch tails
      -> GRPO update with TIS -> weight sync -> (controller adjusts the schedule) -> log, checkpoint

Runs the trainer in this process (world size 1 on CPU, or one rank of a torchrun job) and drives a
fleet of SGLang engines it launches or attaches to.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparrow_megatron.config import JobConfig, validate
from sparrow_megatron.errors import UserError
from sparrow_megatron.loop import overlong, spmd
from sparrow_megatron.loop.checkpointing import CheckpointCommits, at_step_boundary
from sparrow_megatron.loop.console import REWARD_KEY, LoopProgress
from sparrow_megatron.loop.controller import BudgetController
from sparrow_megatron.loop.evaluate import EvalSpec, eval_sampling, evaluate
from sparrow_megatron.loop.monitor import TailMonitor
from sparrow_megatron.loop.overlap import RolloutSide
from sparrow_megatron.loop.preempt import StepBoundary, StopRequest
from sparrow_megatron.loop.recorder import StepRecorder, summary_markdown
from sparrow_megatron.loop.rollout_dump import rollout_rows
from sparrow_megatron.loop.rundir import RunDir
from sparrow_megatron.loop.tasks import make_task
from sparrow_megatron.loop.tracking import MlflowTracker, context_tags, dataset_refs
from sparrow_megatron.loop.weight_sync import weight_sync
from sparrow_megatron.rollout.config import FleetOptions, LoraServerConfig, RolloutConfig
from sparrow_megatron.rollout.fleet import RolloutFleet
from sparrow_megatron.rollout.types import Sample, SamplingParams, topk_tensors
from sparrow_megatron.sparsity.schedule import Schedule, resolve_schedule
from sparrow_megatron.trainer.batch import RolloutBatch
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
    evals: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # (after step, eval/* metrics)

    def add_recorded(self, rows: list[dict], before: int) -> None:
        """A resumed run summarizes the whole run, not only its own steps: the steps and evaluations its
        predecessors recorded (metrics.jsonl rows of steps before `before`) come first."""
        for row in (r for r in rows if r["step"] < before):
            metrics = {k: v for k, v in row.items() if k != "step"}
            if "eval/n" in row:
                self.evals.append((row["step"], metrics))
            elif REWARD_KEY in row:
                self.steps.append(StepResult(row["step"], metrics, None))
            else:  # not a step's row (edited by hand?): the summary goes on without it
                log.warning(
                    "metrics.jsonl: step %s's row has no %s; left out of the summary", row["step"], REWARD_KEY
                )


def fleet_options(cfg: JobConfig, model_dir: Path, run_dir: RunDir) -> FleetOptions:
    """What the fleet needs besides the rollout section: the model, where logs go, the seed, and the
    LoRA capacity DistillSparse's adapter needs (none when it is off)."""
    lora = None
    if cfg.distill.enabled:
        lora = LoraServerConfig(max_rank=cfg.distill.rank, target_modules=tuple(cfg.distill.target_modules))
    return FleetOptions(model_path=str(model_dir), run_dir=str(run_dir.root / "engines"), seed=cfg.loop.seed,
                        lora=lora)  # fmt: skip


def attached_rollout(cfg: JobConfig) -> RolloutConfig:
    """The rollout section with rollout.urls resolved (`env`: from the Slurm job) and those engines
    waited for, since the rollout group starts together with the trainer."""
    from sparrow_megatron.launch.contract import resolve_rollout_urls, wait_for_engines

    urls = resolve_rollout_urls(cfg.rollout.urls)
    if urls:
        wait_for_engines(urls, cfg.cluster.rollout_start_timeout_s)
    return replace(cfg.rollout, urls=urls)


def resolve_model_dir(cfg: JobConfig) -> Path:
    if cfg.model.hf_dir:
        path = Path(cfg.model.hf_dir)
        if not (path / "config.json").is_file():
            raise UserError(
                f"field 'model.hf_dir': {path} has no config.json (a Hugging Face checkpoint dir)"
            )
        return path
    from sparrow_megatron.data.recall import TINY_RECALL_DIR

    return TINY_RECALL_DIR


def to_trainer_batch(
    samples: list[Sample], rewards: list[float], group_ids: list[int], adv_eps: float, std: str = "unbiased"
):
    advantages = group_advantages(rewards, group_ids, eps=adv_eps, std=std)
    return RolloutBatch(
        prompt_ids=[s.prompt_ids for s in samples],
        response_ids=[s.output_ids for s in samples],
        rollout_logprobs=[s.logprobs for s in samples],
        advantages=advantages.tolist(),
        group_ids=list(group_ids),
    )


class Loop:
    def __init__(self, cfg: JobConfig, resume: bool = False):
        validate(cfg)
        self.cfg = cfg
        self.run = RunDir(cfg.run_dir)
        self.model_dir = resolve_model_dir(cfg)
        if spmd.launch_rank() != 0:
            return  # a follower rank: rank 0 owns the run directory
        if self.run.exists() and not resume and self.run.read_metrics():
            raise UserError(
                f"{cfg.run_dir} already holds a run: pass --resume to continue it, or another run_dir"
            )
        self.run.create(cfg)

    def train(self) -> RunSummary:
        from sparrow_megatron.trainer.policy import Policy

        cfg = self.cfg
        base = Policy(
            cfg.trainer, cfg.grpo, model_dir=self.model_dir, total_steps=cfg.loop.steps,
            temperature=cfg.rollout.temperature, top_k_logprobs=cfg.rollout.top_k_logprobs, seed=cfg.loop.seed,
        )  # fmt: skip
        distiller = _make_distiller(cfg, base) if cfg.distill.enabled else None
        if spmd.launch_rank() != 0:
            spmd.follow({"policy": base, "distill": distiller})
            return RunSummary(run_dir=self.run.root)
        driver = spmd.Driver()
        policy = spmd.DrivenPolicy(base, driver)
        self.distill = _Distill(cfg, spmd.DrivenDistiller(distiller, driver), self.run) if distiller else None
        try:
            with StopRequest(self.run.root) as self._stop:  # USR1/SIGTERM: stop at the next step boundary
                return self._drive(policy)
        finally:
            driver.stop()

    def _drive(self, policy: spmd.DrivenPolicy) -> RunSummary:
        from sparrow_megatron.data.datasets import load_tokenizer

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
        resume = self.run.prepare_resume()
        if resume.checkpoint is not None:
            policy.load_checkpoint(resume.checkpoint.path / "policy")
            if self.distill is not None:
                self.distill.load(resume.checkpoint.path / "distill")
            monitor.load_state_dict(resume.loop_state["monitor"])
            if controller is not None:
                controller.load_state_dict(resume.loop_state["controller"])
                schedule = controller.schedule
        summary = RunSummary(run_dir=self.run.root, mlflow_uri=cfg.mlflow_uri)
        if resume.checkpoint is not None:
            summary.add_recorded(self.run.read_metrics(), before=resume.next_step)
        sampling = SamplingParams(
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            max_new_tokens=cfg.data.max_response_tokens,
        )
        fleet = RolloutFleet(attached_rollout(cfg), fleet_options(cfg, self.model_dir, self.run))
        self._rollout = RolloutSide(cfg.loop.overlap, cfg, task, tokenizer, fleet, sampling, cfg.loop.steps)
        if resume.checkpoint is not None:
            self._rollout.load(resume.checkpoint.path)  # one_step: the batch generated for the next step
        tracker = MlflowTracker.from_config(cfg)
        progress = LoopProgress(cfg.loop.steps, resume.step, cfg.monitor.tau)
        with tracker, fleet, progress, contextlib.closing(task):  # the task's judge pools stop with the loop
            resumed = resume.checkpoint is not None
            progress.announce(self.run.root, resume.step if resumed else None)
            tags = context_tags(cfg.name)
            if cfg.data.kind == "code":  # only a code task runs generated programs: its isolation is a tag
                tags |= cfg.reward.mlflow_tags()
            tracker.start(params=cfg.to_flat_dict(), tags=tags, resume=resumed)
            summary.ui_command = tracker.ui_command()
            t = cfg.trainer
            recorder = StepRecorder(
                self.run, tracker, progress, monitor, plot_every=cfg.loop.checkpoint_every,
                constant_keys=("train/lr",) if t.lr_schedule == "constant" and not t.warmup_steps else (),
            )  # fmt: skip
            if not resumed:
                tracker.log_datasets(dataset_refs(cfg, task))
                recorder.log_record()
            self._sync = weight_sync(cfg, fleet, self.run.root)
            if resume.checkpoint is not None:
                # The engines start from the base model: push the resumed weights, under the versions
                # the uninterrupted run would have (step s's sync made weights v(s), adapter v(s)).
                fleet.continue_versions(resume.step - 1, resume.step - 1)
                self._sync.push(policy)
                if self.distill is not None:
                    self.distill.push(fleet, resume.step)
            elif schedule is not None:
                recorder.schedule_changed(1, schedule)
            run_eval = self._evaluator(fleet, task, tokenizer, sampling, recorder, summary)
            # The initial policy: the baseline every later evaluation is read against (once per run).
            if run_eval and not any(r["step"] == 0 and "eval/n" in r for r in self.run.read_metrics()):
                run_eval(0, schedule)
            loop = cfg.loop
            boundary = StepBoundary(self._stop, loop.steps, loop.checkpoint_every, loop.checkpoint_every_s)
            self._commits = CheckpointCommits(policy, self.run, cfg.trainer.async_save)
            for step in range(resume.next_step, cfg.loop.steps + 1):
                metrics, next_schedule, changes = self._step(
                    step, fleet, policy, monitor, schedule, controller
                )
                recorder.record(step, metrics, schedule)
                summary.steps.append(StepResult(step, metrics, schedule))
                if changes:
                    recorder.schedule_changed(step + 1, next_schedule, changes)
                schedule = next_schedule
                if run_eval and (step % cfg.loop.eval_every == 0 or step == cfg.loop.steps):
                    run_eval(step, schedule)
                # A stop request (time limit) exits here to be requeued, its checkpoint committed.
                at_step_boundary(step, boundary, self._commits,
                                 lambda s: self._checkpoint(policy, s, monitor, controller))  # fmt: skip
            self._commits.wait()  # the last checkpoint complete before the export and the end
            summary.throughput = _measure_throughput(fleet, task, tokenizer, cfg, schedule)
            recorder.plots()
            final = self.run.root / "final_hf"
            shutil.rmtree(final, ignore_errors=True)
            policy.export_hf(final)
            tracker.log_weights(final, cfg.tracking.copy_weights)
            if self.distill is not None:
                tracker.log_artifact(self.distill.latest_export(), "final_adapter")
            tracker.set_description(summary_markdown(summary, cfg.monitor.tau))
        return summary

    def _evaluator(self, fleet, task, tokenizer, sampling, recorder, summary: RunSummary):
        """run_eval(step, schedule): evaluate the weights after `step` updates and record it; None if off."""
        loop = self.cfg.loop
        if not loop.eval_every:
            return None
        # A file set is evaluated whole by default; the synthetic task's generated split has no end.
        prompts = loop.eval_prompts or (loop.prompts_per_step if self.cfg.data.kind == "synthetic" else 0)
        spec = EvalSpec(prompts, loop.eval_samples, loop.eval_pass_reward)
        seeded = eval_sampling(sampling, loop.seed, loop.eval_max_response_tokens)

        def run_eval(step: int, schedule: Schedule | None) -> None:
            metrics = evaluate(fleet, task, tokenizer, spec, seeded, schedule)
            recorder.record_eval(step, metrics)
            summary.evals.append((step, metrics))

        return run_eval

    def _step(self, step, fleet, policy, monitor, schedule, controller):
        """One RL step: rollout -> reward -> dense score -> tails -> GRPO update -> weight sync. Returns
        (metrics, the schedule of the next batch, the controller's changes). Under loop.overlap=one_step
        the batch was generated during the previous step and the next one is generated during this
        step's score and update (loop/overlap.py)."""
        cfg = self.cfg
        self._sync.catch_up(policy)  # engines that came back get the current weights before serving
        t0 = time.perf_counter()
        timer = _PhaseTimer()
        rollout = self._rollout.take(step, schedule)
        got, samples = rollout.got, rollout.samples
        timer.lap("rollout")
        rewards = overlong.shaped_rewards(cfg.grpo, cfg.data.max_response_tokens, samples, got.rewards)
        batch = to_trainer_batch(samples, rewards, got.group_ids, cfg.grpo.adv_eps, std=cfg.grpo.std)
        batch.response_masks = overlong.loss_masks(cfg.grpo, samples)
        dense = rollout.dense  # one_step: the engines' dense top-K at the weights that sampled
        if dense is None:  # the trainer's weights are the ones that sampled: its scores are the reference
            score = policy.score(batch)
            timer.lap("score")
            dense = list(zip(score.topk_ids, (lp.double() for lp in score.topk_logprobs), strict=True))
        rollout_ids, rollout_lps = zip(
            *(topk_tensors(s, cfg.rollout.top_k_logprobs) for s in samples), strict=True
        )
        tails = monitor.observe_topk(
            step,
            torch.cat([ids for ids, _ in dense]),
            torch.cat([lps for _, lps in dense]),
            torch.cat(rollout_ids),
            torch.cat(rollout_lps),
            np.concatenate([len(s.prompt_ids) + np.arange(s.response_len) for s in samples]),
        )
        timer.lap("tails")
        next_schedule, changes = (
            controller.update(step, tails.p5_by_bin(), cfg.monitor.bin_width)
            if controller is not None
            else (schedule, [])
        )
        self._rollout.prefetch(step + 1, next_schedule)  # one_step: batch n+1 runs from here
        if rollout.dense is not None:
            score = policy.score(batch, top_k=0)  # old log-probs only: the tails are done
            timer.lap("score")
        batch.old_logprobs = score.logprobs
        if cfg.loop.dump_rollouts:
            self.run.write_rollouts(step, rollout_rows(samples, got.rewards, rewards, score.logprobs))
        metrics = {f"train/{k}": v for k, v in policy.train_step(batch).items()}
        timer.lap("update")
        self._rollout.join()  # the sync waits for the rollout on the previous weights
        timer.lap("rollout_wait")
        metrics.update(self._sync.push(policy))
        timer.lap("sync")
        metrics.update(self._rollout.overlap_metrics(rollout))
        if self.distill is not None:  # DistillSparse: adapter update on the same rollout, then to the fleet
            metrics["rollout/batch_adapter_version"] = float(_Distill.batch_version(samples))
            metrics.update(self.distill.step(step, batch, score.logprobs, schedule, fleet))
            timer.lap("distill")
        metrics.update(timer.metrics())
        metrics.update(tails.metrics())
        metrics.update(got.metrics())
        metrics.update(overlong.metrics(samples, got.rewards, rewards))
        metrics.update({
            # Groups whose samples all score the same carry no GRPO signal: the share that does.
            "reward/signal_frac": float(np.mean(np.abs(batch.advantages) > 0)) if samples else 0.0,
            "rollout/weight_version": float(fleet.weight_version),
            "rollout/batch_weight_version": float(rollout.weight_version),  # the weights that generated it
            "time/step_s": time.perf_counter() - t0,
        })  # fmt: skip
        return metrics, next_schedule, changes

    def _checkpoint(
        self, policy, step: int, monitor: TailMonitor, controller: BudgetController | None
    ) -> Path:
        """Write step's checkpoint into its partial directory (checkpointing.py commits it); returns the
        policy's directory."""
        path = self.run.begin_checkpoint(step)
        policy.save_checkpoint(path / "policy", step=step)
        if self.distill is not None:
            self.distill.save(path / "distill")
        self._rollout.save(path)
        state: dict[str, Any] = {"monitor": monitor.state_dict()}
        if controller is not None:
            state["controller"] = controller.state_dict()
        RunDir.write_loop_state(path, state)
        return path / "policy"


# ---------------------------------------------------------------- DistillSparse


def _make_distiller(cfg: JobConfig, policy):
    """The adapter trainer; every rank builds it the same way (same seed: the same initial adapter)."""
    from sparrow_megatron.trainer.distill import SparseDistiller
    from sparrow_megatron.trainer.lora import lora_spec_from

    d = cfg.distill
    spec = lora_spec_from(d, seed=cfg.loop.seed)
    return SparseDistiller(policy, spec, d.kl_lambda, d.lr, d.tis_cap, d.budget_mode, d.fixed_budget)


class _Distill:
    """The loop's side of DistillSparse: distill step, PEFT export, fleet load, probe metrics, state."""

    PROBE_SAMPLES = 8
    PROBE_FILE = "probe.pt"

    def __init__(self, cfg: JobConfig, distiller: spmd.DrivenDistiller, run: RunDir):
        self.distiller = distiller
        self.run = run
        self.top_k = cfg.rollout.top_k_logprobs
        self.probe: RolloutBatch | None = None  # the first step's first samples, fixed for the run

    def step(self, step: int, batch: RolloutBatch, dense_logprobs, schedule, fleet) -> dict[str, float]:
        schedules = [schedule] * len(batch)
        metrics = {
            f"distill/{k}": v for k, v in self.distiller.step(batch, dense_logprobs, schedules).items()
        }
        metrics["distill/adapter_version"] = float(self.push(fleet, step))
        if self.probe is None:
            n = min(self.PROBE_SAMPLES, len(batch))
            self.probe = RolloutBatch(batch.prompt_ids[:n], batch.response_ids[:n])
        probe = self.distiller.probe_acceptance(self.probe, [schedule] * len(self.probe), self.top_k)
        metrics.update({f"distill/{k}": v for k, v in probe.items()})
        return metrics

    @staticmethod
    def batch_version(samples) -> int:
        """The adapter version that generated a batch (0: none yet). The push happens after the rollout
        side joined, so under loop.overlap=one_step too a batch never mixes two adapters."""
        names = {s.adapter for s in samples}
        if len(names) > 1:
            raise RuntimeError(f"one batch generated by several adapters: {sorted(map(str, names))}")
        name = names.pop() if names else None
        return int(name.rsplit("-v", 1)[1]) if name else 0

    def push(self, fleet, step: int) -> int:
        """Export the adapter and load it into the fleet under a new version; returns that version."""
        out = self.run.root / "adapters" / f"step_{step:06d}"
        shutil.rmtree(out, ignore_errors=True)
        self.distiller.export(out)
        name = fleet.load_adapter(out)  # the engines unload the previous version
        for old in out.parent.iterdir():  # so its files can go: one adapter on disk, not one per step
            if old != out:
                shutil.rmtree(old, ignore_errors=True)
        return int(name.rsplit("-v", 1)[1])

    def latest_export(self) -> Path:
        """The PEFT adapter the fleet serves now (push keeps one on disk)."""
        return max((self.run.root / "adapters").iterdir())

    def save(self, path: Path) -> None:
        self.distiller.save(path)
        torch.save({"probe": self.probe}, path / self.PROBE_FILE)

    def load(self, path: Path) -> None:
        self.distiller.load(path)
        if not (path / self.PROBE_FILE).is_file():  # an older checkpoint: the next step picks a probe
            log.warning("%s: no probe set saved; the next step's samples become the probe", path)
            return
        self.probe = torch.load(path / self.PROBE_FILE, weights_only=False)["probe"]


class _PhaseTimer:
    """Seconds per phase of a step (time/<phase>_s): where an RL step goes is the point of sparse rollout."""

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = now - self.last
        self.last = now

    def metrics(self) -> dict[str, float]:
        return {f"time/{name}_s": seconds for name, seconds in self.phases.items()}


def _measure_throughput(fleet, task, tokenizer, cfg: JobConfig, schedule) -> dict[str, float]:
    """Rollout tokens/s (and greedy reward) of the same prompts (the first eval set's, else the train
    split's), dense and with the schedule."""
    n = cfg.rollout.n_samples
    spec = EvalSpec(max(cfg.loop.prompts_per_step, 1), n)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=cfg.data.max_response_tokens)
    name, size = next(iter(task.eval_sets().items()), ("train", None))
    out = evaluate(fleet, task, tokenizer, spec, greedy, schedule, sets={name: size})
    result = {}
    for path in ("dense", "sparse"):
        if f"eval/{name}/{path}/tokens_per_s" in out:
            result[f"{path}_tokens_per_s"] = out[f"eval/{name}/{path}/tokens_per_s"]
            result[f"{path}_greedy_reward"] = out[f"eval/{name}/{path}/mean_at_{n}"]
    return result
