import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from sparrow_megatron.cli import serve
from sparrow_megatron.errors import UserError


def parse(argv):
    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def test_bad_model_dir_and_bad_schedule_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        serve.build_config(parse(["--model", str(tmp_path)]))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="unknown schedule 'nope'"):
        serve.build_config(parse(["--model", str(tmp_path), "--schedule", "nope"]))
    argv = ["--model", str(tmp_path), "--engines", "2", "--schedule", "qwen3-4b-0.86", "--lora-rank", "8"]
    rollout, options = serve.build_config(parse(argv))
    assert rollout.engines == 2 and options.server_schedule == "qwen3-4b-0.86" and options.lora.max_rank == 8
    argv += ["--lora-target-modules", "q_proj,k_proj,v_proj, o_proj"]
    assert serve.build_config(parse(argv))[1].lora.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    with pytest.raises(UserError, match="--lora-target-modules needs --lora-rank"):
        serve.build_config(parse(["--model", str(tmp_path), "--lora-target-modules", "q_proj"]))


def test_cluster_flags_bind_to_the_given_address_and_exact_ports(tmp_path):
    import socket

    (tmp_path / "config.json").write_text("{}")
    argv = ["--model", str(tmp_path), "--host", "10.0.0.5", "--tp", "2", "--kv-pool-tokens", "4096"]
    rollout, options = serve.build_config(parse(argv))  # a node's own address is allowed
    assert (options.host, rollout.engine_tp, rollout.kv_pool_tokens) == ("10.0.0.5", 2, 4096)
    with pytest.raises(UserError, match="servers bind to one address"):  # every interface is not
        serve.build_config(parse(["--model", str(tmp_path), "--host", "0.0.0.0"]))
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        exact = ["--model", str(tmp_path), "--port-base", str(port), "--exact-ports"]
        with pytest.raises(UserError, match=f"port\\(s\\) {port} on 127.0.0.1 are in use"):
            serve.build_config(parse(exact))


@pytest.mark.sglang
@pytest.mark.timeout(900)
def test_serve_prints_urls_serves_and_stops_on_ctrl_c(tiny_model_dir, tmp_path):
    cmd = [sys.executable, "-c", _SERVE_ONLY, "--model", str(tiny_model_dir), "--engines", "1",
           "--run-dir", str(tmp_path / "logs")]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines, url, pid = [], None, None
    try:
        deadline = time.monotonic() + 800
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("engine 0: "):
                url = line.split()[2]
                pid = int(line.split("pid ")[1].rstrip(")\n"))
            if line.startswith("serving"):
                break
        assert url is not None, "".join(lines)
        body = json.dumps(
            {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 3, "temperature": 0}}
        )
        req = urllib.request.Request(
            url + "/generate", data=body.encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=120) as resp:
            assert len(json.loads(resp.read())["output_ids"]) == 3
        # Keep reading what serve prints while it stops: an undrained pipe would block its writes.
        drain = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        drain.start()
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends to the foreground group
        assert proc.wait(timeout=300) == 0, "".join(lines[-50:])
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)  # the server's whole process group is gone
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


# Only the serve command: the CLI's other command modules are not needed to serve.
_SERVE_ONLY = (
    "import argparse, sys\n"
    "from sparrow_megatron.cli import serve\n"
    "p = argparse.ArgumentParser(); serve.register(p.add_subparsers(dest='command'))\n"
    "a = p.parse_args(['serve', *sys.argv[1:]]); sys.exit(a.func(a))\n"
)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from sparrow_megatron.models.tiny import TinyQwen3Shape, make_tiny_qwen3

    return make_tiny_qwen3(tmp_path_factory.mktemp("serve_tiny"), TinyQwen3Shape(num_hidden_layers=2))
