"""The `rollout` section of the job config, and the launch options of a fleet that are not job keys.

`RolloutFleet(rollout, options)` takes the section as the job config holds it; `FleetOptions` carries
what the caller knows at run time (the model path, the run directory, the seed, LoRA capacity) and the
launch knobs of `sparrow serve` and the tests (host, ports, device, health probing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sparrow_megatron.validation import Problems

# SGLang flags that let a tiny model serve on a 2-core CPU machine next to other processes: no CUDA
# graphs (there is no CUDA), no warm-up request, and a scheduler that sleeps when idle instead of
# busy-polling a core. The KV pool is kept small separately (server.CPU_MAX_TOTAL_TOKENS).
CPU_SERVER_ARGS = (
    "--device", "cpu",
    "--cuda-graph-backend-decode", "disabled",
    "--cuda-graph-backend-prefill", "disabled",
    "--skip-server-warmup",
    "--sleep-on-idle",
)  # fmt: skip

WeightSync = Literal["http", "distributed", "disk"]


@dataclass
class RolloutConfig:
    engines: int = 1
    engine_tp: int = 1
    n_samples: int = 8  # per prompt (the GRPO group)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k_logprobs: int = 20
    # A preset name (sparsity.schedule.PRESETS), a schedule file, or "dense". Page geometry and the
    # dense layers come from the schedule.
    schedule: str = "dense"
    # SGLang --attention-backend of launched engines; "" lets SGLang choose for the device.
    attention_backend: str = "sparrow"
    timeout_s: float = 600.0
    kv_pool_tokens: int = 0  # SGLang --max-total-tokens per engine; 0 = its default for the device
    # Requests in flight per engine. 1 makes CPU rollouts bit-reproducible (each request decodes alone,
    # so batch composition cannot move the float bits) at the cost of batching.
    max_inflight_per_engine: int = 64
    # Trainer -> engines weight path (docs/cluster.md, "Weight sync"): "http" (update_weights_from_tensor,
    # one copy per engine through JSON; the CPU default), "distributed" (one broadcast group, NCCL on
    # GPU / gloo on CPU, rendezvous at SPARROW_WEIGHT_SYNC_ADDR on Slurm; the GPU recipes' default) or
    # "disk" (a safetensors snapshot under the run dir that every engine reloads: needs storage the
    # engines share with the trainer).
    weight_sync: WeightSync = "http"
    # Bytes per weight bucket (the unit of one HTTP request or one broadcast).
    weight_sync_bucket_mb: int = 512
    # Attach mode: base URLs (http://host:port) of running engines instead of launching `engines`.
    # ["env"] resolves them at loop start from the Slurm job's env contract (launch/contract.py).
    urls: list[str] = field(default_factory=list)
    # Extra SGLang flags (with their values) for every launched engine, after the fleet's own flags,
    # e.g. ["--cuda-graph-max-bs", "64"]. Not used in attach mode: those engines are already running.
    server_args: list[str] = field(default_factory=list)

    def problems(self, prefix: str = "rollout.") -> list[str]:
        from sparrow_megatron.errors import UserError
        from sparrow_megatron.sparsity.schedule import resolve_schedule

        p = Problems(prefix)
        p.at_least(1, engines=self.engines, engine_tp=self.engine_tp, n_samples=self.n_samples,
                   max_inflight_per_engine=self.max_inflight_per_engine,
                   top_k_logprobs=self.top_k_logprobs,
                   weight_sync_bucket_mb=self.weight_sync_bucket_mb)  # fmt: skip
        p.at_least(0, kv_pool_tokens=self.kv_pool_tokens)
        p.positive(temperature=self.temperature, timeout_s=self.timeout_s)
        p.need(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        p.need(
            self.n_samples >= 2,
            "n_samples",
            f"GRPO needs >= 2 samples per prompt for a group advantage, got {self.n_samples}",
        )
        for i, url in enumerate(self.urls):
            p.need(
                url.startswith(("http://", "https://")) or (url == "env" and len(self.urls) == 1),
                f"urls[{i}]",
                f"{url!r} is not an http(s):// base URL (or the single word 'env': from the Slurm job)",
            )
        if self.server_args:
            p.need(
                self.server_args[0].startswith("-"),
                "server_args",
                f"must start with an SGLang flag (--name), got {self.server_args[0]!r}",
            )
        for flag in self.server_args:
            name = flag.partition("=")[0]  # --flag=value names the flag too
            owner = FLEET_OWNED_FLAGS.get(name)
            p.need(owner is None, "server_args", f"{name} is set by the fleet (from {owner}); leave it out")
        try:
            resolve_schedule(self.schedule)
        except UserError as err:
            p.need(False, "schedule", str(err))
        return p


# SGLang flags the fleet sets itself, each with the job key (or launch setting) that owns it: given again
# in rollout.server_args they would silently override the section (or break the fleet's bookkeeping).
FLEET_OWNED_FLAGS = {
    "--model-path": "model.hf_dir",
    "--host": "the fleet's host",
    "--port": "the fleet's ports",
    "--tp-size": "rollout.engine_tp",
    "--attention-backend": "rollout.attention_backend",
    "--max-total-tokens": "rollout.kv_pool_tokens",
    "--random-seed": "loop.seed",
    "--weight-version": "the fleet's weight versions",
}


@dataclass
class LoraServerConfig:
    """Server-side LoRA capacity: fixed at launch, so it must cover every adapter DistillSparse trains."""

    max_rank: int = 16
    # SGLang's fused names must be targeted consistently: q/k/v together, gate/up together.
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    max_loras_per_batch: int = 2
    backend: str | None = None  # None: SGLang's default for the device


@dataclass
class FleetOptions:
    """How a fleet launches and watches its engines: what the caller supplies besides the section."""

    model_path: str | None = None
    run_dir: str | None = None  # server logs go here; None: a temporary directory
    seed: int | None = 0  # SGLang --random-seed
    lora: LoraServerConfig | None = None
    # Server-wide default schedule (preset name or file) for `sparrow serve`; the loop passes its
    # schedule with every request instead, so that dense requests stay dense.
    server_schedule: str | None = None
    host: str = "127.0.0.1"
    port_base: int | None = None  # None: any free ports
    page_size: int = 16  # the sparse backend's page: the granularity of block selection
    device: Literal["auto", "cpu", "cuda"] = "auto"  # "auto": cpu when CUDA is absent
    mem_fraction_static: float | None = None
    context_length: int | None = None
    dtype: str | None = None
    extra_server_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    startup_timeout_s: float = 300.0
    # Attempts per request across engines before the batch raises with every reason.
    max_attempts: int = 3
    restart_dead: bool = True
    health_interval_s: float = 5.0
    # Consecutive failed /health probes before a live process counts as dead (a busy CPU engine can be
    # slow to answer); an exited process is dead at once. The probe is liveness only (launched engines
    # run no generation for it, see server_env); a hung forward pass is SGLang's watchdog's to kill.
    health_strikes: int = 3
    # Per-request sampling seeds (SamplingParams.seed) honoured by the engines, so a sample's tokens do
    # not depend on what the engine served before (a resumed run samples what the uninterrupted one did).
    seeded_sampling: bool = True

    def problems(self, launching: bool) -> list[str]:
        p = Problems("fleet.")
        if launching:
            p.need(self.model_path is not None, "model_path", "is required to launch engines (or give urls)")
            # Launched servers bind to one explicit address: loopback by default, a cluster node's own
            # address when a launcher passes it (the trainer is on another node); never every interface.
            p.need(
                self.host not in ("", "0.0.0.0", "::", "*"),
                "host",
                f"servers bind to one address (127.0.0.1 or the node's), got {self.host!r}",
            )
        p.at_least(1, max_attempts=self.max_attempts, health_strikes=self.health_strikes)
        return p
