"""Node-side wrapper of one het group's command: `python -m sparrow_megatron.launch.task ROLE ... -- CMD`.

It runs on every node of its group (one Slurm task per node), turns the job's environment into the
final argv (torchrun around the trainer, `--resume` after a requeue) and execs it, so the signals
Slurm sends reach the real process. Kept free of heavy imports: it starts on every node.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import socket
import sys


def restart_count(env: dict[str, str]) -> int:
    """How often Slurm has restarted this job (requeue after preemption or failure); 0 locally."""
    raw = env.get("SLURM_RESTART_COUNT") or env.get("SPARROW_RESTART_COUNT") or "0"
    try:
        return int(raw)
    except ValueError:
        return 0


_PLACEHOLDER = re.compile(r"\$\{(SPARROW_[A-Z0-9_]+)\}")


def expand(arg: str, env: dict[str, str]) -> str:
    """`${SPARROW_X}` in an argument -> its value on this node (e.g. `--host ${SPARROW_NODE_ADDR}`): the
    command is written at submit time, addresses are known only here. Only SPARROW_ names, so nothing
    else in a command is touched; an unknown one is an error, not an empty string."""

    def value(match: re.Match) -> str:
        name = match.group(1)
        if name not in env:
            raise SystemExit(f"sparrow task: {name} is not set on this node (needed by {arg!r})")
        return env[name]

    return _PLACEHOLDER.sub(value, arg)


def node_addr(env: dict[str, str]) -> str:
    """This node's address as the other group sees it: its entry in SPARROW_ROLLOUT_ADDRS (rollout
    nodes), else the first address its hostname resolves to."""
    addrs = [a for a in env.get("SPARROW_ROLLOUT_ADDRS", "").split(",") if a]
    rank = int(env.get("SPARROW_NODE_RANK", "0"))
    if env.get("SPARROW_ROLE") == "rollout" and rank < len(addrs):
        return addrs[rank]
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def build_command(
    role: str,
    cmd: list[str],
    env: dict[str, str],
    *,
    launcher: str = "none",
    nnodes: int = 1,
    nproc_per_node: int = 1,
    rdzv_port: int = 29500,
    resume_flag: str = "",
    python: str = sys.executable,
) -> list[str]:
    """The argv that runs on this node for `role` ("rollout" or "trainer")."""
    argv = [expand(a, env) for a in cmd]
    # A restarted job resumes from the last checkpoint; a fresh one must not look for one.
    if role == "trainer" and resume_flag and (restart_count(env) > 0 or env.get("SPARROW_RESUME") == "1"):
        argv.append(resume_flag)
    if role == "trainer" and launcher == "torchrun":
        head = env.get("SPARROW_TRAINER_HEAD", "127.0.0.1")
        # One rendezvous per job run: a requeued job gets a fresh id, so stale peers cannot join.
        run_id = f"{env.get('SLURM_JOB_ID', env.get('SPARROW_JOB_NAME', 'local'))}-{restart_count(env)}"
        argv = [
            python,
            "-m",
            "torch.distributed.run",
            f"--nnodes={nnodes}",
            f"--nproc-per-node={nproc_per_node}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={head}:{rdzv_port}",
            f"--rdzv-id={run_id}",
            "--no-python",
            *argv,
        ]
    return argv


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sparrow_megatron.launch.task", description=__doc__)
    parser.add_argument("role", choices=["rollout", "trainer"])
    parser.add_argument("--launcher", choices=["torchrun", "none"], default="none")
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument("--rdzv-port", type=int, default=29500)
    parser.add_argument("--resume-flag", default="")
    # Split at the first `--` ourselves: argparse's REMAINDER would swallow the options before it.
    if "--" not in argv:
        parser.error("no command after --")
    cut = argv.index("--")
    args = parser.parse_args(argv[:cut])
    args.cmd = argv[cut + 1 :]
    if not args.cmd:
        parser.error("no command after --")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ)
    env["SPARROW_ROLE"] = args.role
    # Slurm numbers the nodes of a het group's step from 0: the rank of this node inside its group.
    env["SPARROW_NODE_RANK"] = env.get("SLURM_NODEID", "0")
    env["SPARROW_NODE_ADDR"] = node_addr(env)
    final = build_command(
        args.role,
        args.cmd,
        env,
        launcher=args.launcher,
        nnodes=args.nnodes,
        nproc_per_node=args.nproc_per_node,
        rdzv_port=args.rdzv_port,
        resume_flag=args.resume_flag,
    )
    print(f"sparrow task [{args.role} node {env['SPARROW_NODE_RANK']}]: {shlex.join(final)}", flush=True)
    os.execvpe(final[0], final, env)


if __name__ == "__main__":
    main()
