"""Start and stop real SGLang servers for the plugin tests (127.0.0.1, free port, own process group)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

START_TIMEOUT_S = 900  # generous: CI machines are shared and start-up is ~30 s only when idle
# On CPU SGLang requires the fraction to exceed the share of host RAM already in use (other processes
# included), so a small value fails on a busy machine; --max-total-tokens caps the KV pool anyway.
MEM_FRACTION = "0.8"


def free_port() -> int:
    # Below the ephemeral range: an OS-picked port can be taken by an outgoing connection before the
    # server binds it (seen in CI with the fleet's engines).
    from sparrow_megatron.rollout.server import free_port as below_ephemeral

    return below_ephemeral()


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path
    env: dict = field(default_factory=dict)

    def post(self, route: str, payload: dict, timeout: float = 300) -> tuple[int, dict]:
        req = urllib.request.Request(
            self.url + route, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as err:
            body = err.read()
            try:
                return err.code, json.loads(body)
            except json.JSONDecodeError:
                return err.code, {"raw": body.decode(errors="replace")}

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def generate(self, text: str, max_new_tokens: int, schedule=None, **extra) -> tuple[int, dict]:
        sampling = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True}
        if schedule is not None:
            sampling["custom_params"] = {"sparrow_schedule": schedule}
        payload = {"text": text, "sampling_params": sampling, "return_logprob": True, **extra}
        return self.post("/generate", payload)

    def stop(self) -> None:
        """SIGTERM the whole process group, then SIGKILL whatever is left (scheduler, detokenizer)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=20)


def launch(
    model: Path,
    log: Path,
    attention_backend: str,
    extra_env: dict | None = None,
    extra_args: tuple[str, ...] = (),
) -> Server:
    port = free_port()
    env = dict(os.environ, SPARROW_SGLANG_CPU="1", HF_HUB_OFFLINE="1", **(extra_env or {}))
    cmd = [
        sys.executable, "-m", "sglang.launch_server", "--model-path", str(model), "--device", "cpu",
        "--host", "127.0.0.1", "--port", str(port), "--attention-backend", attention_backend,
        "--cuda-graph-backend-decode", "disabled", "--cuda-graph-backend-prefill", "disabled",
        "--mem-fraction-static", MEM_FRACTION, "--max-total-tokens", "4096", "--page-size", "16",
        "--skip-server-warmup", "--sleep-on-idle", "--random-seed", "0", *extra_args,
    ]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", proc, log, extra_env or {})
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            server.stop()
            raise RuntimeError(
                f"SGLang exited with {proc.returncode} during start-up; log {log}:\n"
                + log.read_text()[-4000:]
            )
        if server.healthy():
            return server
        time.sleep(1.0)
    server.stop()
    raise RuntimeError(f"SGLang did not become healthy in {START_TIMEOUT_S}s; log {log}")
