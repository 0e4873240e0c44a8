"""Typed configuration of the rollout fleet (one dataclass, composed into the run's config tree)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sparrow_megatron.errors import UserError

# SGLang flags that let a tiny model serve on a 2-core CPU machine next to other processes
# (NOTES.md, "SGLang"): no CUDA graphs, a small static pool, no warm-up, and a scheduler that sleeps
# when idle instead of burning a core.
CPU_SERVER_ARGS = (
    "--device", "cpu",
    "--cuda-graph-backend-decode", "disabled",
    "--cuda-graph-backend-prefill", "disabled",
    "--skip-server-warmup",
    "--sleep-on-idle",
)  # fmt: skip


def check_server_args(values: object, where: str) -> list[str]:
    """Extra SGLang flags as a list of strings (UserError naming `where` otherwise)."""
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
        raise UserError(f"{where}: expected a list of strings (SGLang flags and values), got {values!r}")
    return list(values)


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
class RolloutConfig:
    """An SGLang rollout fleet: N engines we launch, or the URLs of engines someone else runs."""

    model_path: str | None = None
    engines: int = 1
    # Attach instead of launching: the base URLs (http://host:port) of running SGLang servers.
    urls: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port_base: int | None = None  # None: any free ports
    # Attention backend of launched servers; None lets the platform choose (torch_native on CPU).
    attention_backend: str | None = "sparrow"
    # Server-wide default schedule (preset name or file); requests may override it.
    schedule: str | None = None
    tp_size: int = 1
    page_size: int = 16  # the sparse backend's page (DESIGN section 1)
    random_seed: int | None = 0
    device: str = "auto"  # "auto": cpu when CUDA is absent
    mem_fraction_static: float | None = None
    max_total_tokens: int | None = None
    context_length: int | None = None
    dtype: str | None = None
    lora: LoraServerConfig | None = None
    extra_server_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    run_dir: str | None = None  # server logs go here; None: a temporary directory
    startup_timeout_s: float = 300.0
    request_timeout_s: float = 600.0
    # Attempts per request across engines before the batch raises with every reason.
    max_attempts: int = 3
    max_inflight_per_engine: int = 64
    restart_dead: bool = True
    health_interval_s: float = 5.0
    # Consecutive failed /health probes before a live process counts as dead (a busy CPU engine can be
    # slow to answer); an exited process is dead at once. The probe is liveness only (launched engines
    # run no generation for it, see server_env); a hung forward pass is SGLang's watchdog's to kill.
    health_strikes: int = 3
    top_logprobs: int = 20
    # Per-request sampling seeds (SamplingParams.seed) honoured by the engines, so a sample's tokens do
    # not depend on what the engine served before (a resumed run samples what the uninterrupted one did).
    seeded_sampling: bool = True
    # "client": least-loaded routing in this process (needed for engine ids, per-engine weight
    # versions and retries); sglang-router would hide the engine behind one URL.
    router: str = "client"

    def validate(self) -> None:
        if not self.urls:
            if self.model_path is None:
                raise UserError("rollout: field 'model_path' is required to launch engines (or give 'urls')")
            if self.engines < 1:
                raise UserError(f"rollout: field 'engines' must be >= 1, got {self.engines}")
        if self.max_attempts < 1:
            raise UserError(f"rollout: field 'max_attempts' must be >= 1, got {self.max_attempts}")
        if self.top_logprobs < 0:
            raise UserError(f"rollout: field 'top_logprobs' must be >= 0, got {self.top_logprobs}")
        if self.router != "client":
            raise UserError(f"rollout: field 'router': only 'client' is supported, got {self.router!r}")
        # Launched servers bind to one explicit address: loopback by default, a cluster node's own
        # address when a launcher passes it (the trainer is on another node); never every interface.
        if not self.urls and self.host in ("", "0.0.0.0", "::", "*"):
            raise UserError(
                f"rollout: field 'host': servers bind to one address (127.0.0.1 or the node's), got {self.host!r}"
            )
