"""One local SGLang server as a subprocess: command line, free port, log file, health wait, shutdown.

Each server runs in its own process group (start_new_session) so shutdown reaches the scheduler and
detokenizer children SGLang forks, not only the launcher.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from sparrow_megatron.rollout.config import CPU_SERVER_ARGS, FleetOptions, RolloutConfig

# Environment variable of the sglang_patches CPU platform (sglang_patches/platform.py: ENV_FLAG).
CPU_PLATFORM_ENV = "SPARROW_SGLANG_CPU"
# SGLang checks that the weights leave this fraction of host memory free for the KV pool, measured while
# other processes allocate too: 0.05 fails on a busy machine. The pool itself is capped by max_total_tokens.
CPU_MEM_FRACTION = 0.25
CPU_MAX_TOTAL_TOKENS = 4096


class EngineStartError(RuntimeError):
    """A launched server exited or did not become healthy in time; the message ends with its log tail."""


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


_PORTS = random.SystemRandom()  # not the seeded global generator: seeded processes would pick alike


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out for outgoing connections (Linux default 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1", start: int | None = None, taken: set[int] = frozenset()) -> int:
    """A free TCP port: the first free one from `start` upward, or a random one below the kernel's
    ephemeral range. A port the OS picks (bind to 0) comes from that range, and a server's port is polled
    (wait_healthy) for seconds before the server binds it: a poll whose own ephemeral port happens to be
    that port connects to itself (TCP self-connect on one host) and holds it, and the server fails with
    "address already in use" (seen in CI). Outgoing connections never take a port below the range."""
    if start is None:
        high = _ephemeral_low()
        low = max(1024, min(20000, high - 1000))
        for _ in range(200):
            port = _PORTS.randrange(low, max(high, low + 1000))  # no room below the range: just above 1024
            if port not in taken and port_is_free(port, host):
                return port
    else:
        for port in range(start, min(start + 1000, 65536)):
            if port not in taken and port_is_free(port, host):
                return port
    raise EngineStartError(f"no free port on {host} from {start}")


def resolve_device(options: FleetOptions) -> str:
    if options.device != "auto":
        return options.device
    return "cuda" if cuda_available() else "cpu"


# What the `sparrow` backend needs from SGLang on GPU. Decode CUDA graphs are supported (on by default
# there); prefill graphs are not: the backend's prefill is the delegate's, and the graph state is ours.
SPARROW_GPU_ARGS = ("--cuda-graph-backend-prefill", "disabled")


def server_command(rollout: RolloutConfig, config: FleetOptions, port: int, model_path: str) -> list[str]:
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", model_path,
           "--host", config.host, "--port", str(port), "--tp-size", str(rollout.engine_tp)]  # fmt: skip
    cpu = resolve_device(config) == "cpu"
    if cpu:
        cmd += CPU_SERVER_ARGS
    cmd += ["--page-size", str(config.page_size)]
    if rollout.attention_backend:
        cmd += ["--attention-backend", rollout.attention_backend]
    # The user's flags (rollout.server_args), then the fleet's per-engine ones (GPU id, weight version).
    extra = [*rollout.server_args, *config.extra_server_args]
    if rollout.attention_backend == "sparrow" and not cpu and SPARROW_GPU_ARGS[0] not in extra:
        cmd += SPARROW_GPU_ARGS
    # On CPU a small KV pool: SGLang sizes it from "device memory", which is the host's RAM there.
    optional = {
        "--mem-fraction-static": config.mem_fraction_static or (CPU_MEM_FRACTION if cpu else None),
        "--max-total-tokens": rollout.kv_pool_tokens or (CPU_MAX_TOTAL_TOKENS if cpu else None),
        "--random-seed": config.seed,
        "--context-length": config.context_length,
        "--dtype": config.dtype,
    }
    for flag, value in optional.items():
        if value is not None:
            cmd += [flag, str(value)]
    if config.lora is not None:
        lora = config.lora
        cmd += ["--enable-lora", "--max-lora-rank", str(lora.max_rank),
                "--lora-target-modules", *lora.target_modules,
                "--max-loras-per-batch", str(lora.max_loras_per_batch)]  # fmt: skip
        # SGLang's default LoRA kernels are Triton (GPU); the pure-torch backend serves on CPU.
        backend = lora.backend or ("torch_native" if cpu else None)
        if backend:
            cmd += ["--lora-backend", backend]
    if config.seeded_sampling and not cpu:
        cmd += ["--sampling-backend", "pytorch"]  # flashinfer's sampler refuses per-request seeds
    return cmd + extra


def server_env(config: FleetOptions) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    if resolve_device(config) == "cpu":
        env[CPU_PLATFORM_ENV] = "1"
    if config.server_schedule is not None:
        env[SCHEDULE_ENV] = config.server_schedule
    if config.seeded_sampling:
        env[SEEDED_SAMPLING_ENV] = "1"
    # SGLang's /health otherwise runs a one-token generation, which joins whatever batch runs next: the
    # fleet's periodic probes would change batch composition, and with it the bits of a seeded sample.
    # The one generation that proves the model serves is /health_generate in wait_healthy.
    env[HEALTH_GENERATION_ENV] = "0"
    env.update(config.env)
    return env


# Server-wide default schedule of the `sparrow` backend (read by sglang_patches in the server).
SCHEDULE_ENV = "SPARROW_SCHEDULE"
# Per-request sampling seeds in the server (sglang_patches/seeded_sampling.py).
SEEDED_SAMPLING_ENV = "SPARROW_SEEDED_SAMPLING"
HEALTH_GENERATION_ENV = "SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION"


@dataclass
class ServerProcess:
    """A launched server: its process (group leader), port, URL and log file."""

    process: subprocess.Popen
    port: int
    url: str
    log_path: Path
    command: list[str]

    @classmethod
    def launch(
        cls, rollout: RolloutConfig, config: FleetOptions, port: int, log_path: Path, model_path: str
    ) -> ServerProcess:
        command = server_command(rollout, config, port, model_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            log.write(f"$ {' '.join(command)}\n".encode())
            log.flush()
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=server_env(config),
                start_new_session=True,  # own process group: killpg reaches SGLang's children
            )
        return cls(process, port, f"http://{config.host}:{port}", log_path, command)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_healthy(self, timeout_s: float, poll_s: float = 0.5) -> None:
        """Block until the server generates a token (/health_generate answers 200); raise with the log tail
        if the process exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=5.0) as client:
            while time.monotonic() < deadline:
                if not self.alive():
                    raise EngineStartError(
                        f"SGLang server on port {self.port} exited with code {self.process.returncode}"
                        f" (log {self.log_path}):\n{self.log_tail()}"
                    )
                try:
                    if client.get(f"{self.url}/health_generate").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(poll_s)
        raise EngineStartError(
            f"SGLang server on port {self.port} not healthy after {timeout_s:.0f} s"
            f" (log {self.log_path}):\n{self.log_tail()}"
        )

    def kill(self, grace_s: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after grace_s; idempotent."""
        pgid = self.process.pid  # the leader of its own session: pgid == pid
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
            # The leader is gone; children may linger a moment in the group.
            if not _group_alive(pgid):
                break
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=1.0)
        # Killed children stay in the group until their new parent reaps them: give that a moment, so
        # "stopped" means no process of the engine is left.
        deadline = time.monotonic() + 10.0
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
