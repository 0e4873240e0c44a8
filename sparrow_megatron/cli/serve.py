"""`sparrow serve`: launch a local SGLang rollout fleet, print its URLs, shut it down on Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import threading
from pathlib import Path

from sparrow_megatron.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="launch a local SGLang fleet (sparse backend) and serve until Ctrl-C",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model", required=True, help="HF checkpoint directory (config.json, safetensors, tokenizer)"
    )
    p.add_argument("--engines", type=int, default=1, help="number of SGLang servers")
    p.add_argument(
        "--schedule",
        default=None,
        help="server-wide default schedule: preset or file (requests may override)",
    )
    p.add_argument("--port-base", type=int, default=None, help="first port to try (default: any free ports)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address the servers bind to: loopback, or on a cluster this node's own address (never 0.0.0.0)",
    )
    p.add_argument(
        "--exact-ports",
        action="store_true",
        help="engine i must get --port-base + i (fail if taken): the trainer of a Slurm job expects them there",
    )
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs per engine")
    p.add_argument("--kv-pool-tokens", type=int, default=None, help="SGLang --max-total-tokens per engine")
    p.add_argument("--seed", type=int, default=0, help="SGLang --random-seed")
    p.add_argument("--attention-backend", default="sparrow", help="SGLang attention backend of the engines")
    p.add_argument("--lora-rank", type=int, default=None, help="enable LoRA adapters up to this rank")
    p.add_argument(
        "--lora-target-modules",
        default=None,
        help="comma-separated HF module names adapters may target (default: every projection)",
    )
    p.add_argument(
        "--server-args",
        action="append",
        default=[],
        metavar="FLAGS",
        help="extra SGLang flags for every engine, one shell-quoted string (repeatable), "
        "e.g. --server-args='--cuda-graph-max-bs 64'",
    )
    p.add_argument("--run-dir", default=None, help="directory for the engines' logs (default: a temp dir)")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for each engine")
    p.add_argument("--no-restart", action="store_true", help="do not restart engines that die")
    p.set_defaults(func=run)


def _lora(args: argparse.Namespace):
    from sparrow_megatron.rollout.config import LoraServerConfig

    if args.lora_rank is None:
        if args.lora_target_modules:
            raise UserError("--lora-target-modules needs --lora-rank")
        return None
    if args.lora_rank < 1:
        raise UserError(f"--lora-rank must be >= 1, got {args.lora_rank}")
    if not args.lora_target_modules:
        return LoraServerConfig(max_rank=args.lora_rank)
    modules = tuple(m.strip() for m in args.lora_target_modules.split(",") if m.strip())
    return LoraServerConfig(max_rank=args.lora_rank, target_modules=modules)


def build_config(args: argparse.Namespace):
    from sparrow_megatron.rollout.config import FleetOptions, RolloutConfig
    from sparrow_megatron.sparsity.schedule import resolve_schedule

    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise UserError(f"--model {model}: not an HF checkpoint directory (no config.json)")
    if args.engines < 1:
        raise UserError(f"--engines must be >= 1, got {args.engines}")
    if args.tp < 1:
        raise UserError(f"--tp must be >= 1, got {args.tp}")
    if args.exact_ports:
        from sparrow_megatron.rollout.server import port_is_free

        if args.port_base is None:
            raise UserError("--exact-ports needs --port-base")
        taken = [
            args.port_base + i for i in range(args.engines) if not port_is_free(args.port_base + i, args.host)
        ]
        if taken:
            raise UserError(f"--exact-ports: port(s) {', '.join(map(str, taken))} on {args.host} are in use")
    try:
        server_args = [flag for text in args.server_args for flag in shlex.split(text)]
    except ValueError as err:
        raise UserError(f"--server-args: {err}") from None
    if args.schedule is not None:
        resolve_schedule(args.schedule)  # a bad preset/file fails here, not in N server logs
    rollout = RolloutConfig(
        engines=args.engines,
        engine_tp=args.tp,
        kv_pool_tokens=args.kv_pool_tokens or 0,
        attention_backend=args.attention_backend or "",
        server_args=server_args,
    )
    options = FleetOptions(
        model_path=str(model.resolve()),
        port_base=args.port_base,
        host=args.host,
        seed=args.seed,
        server_schedule=args.schedule,
        lora=_lora(args),
        run_dir=args.run_dir,
        startup_timeout_s=args.startup_timeout,
        restart_dead=not args.no_restart,
    )
    found = rollout.problems() + options.problems(launching=True)
    if found:
        raise UserError("sparrow serve:\n  " + "\n  ".join(found))
    return rollout, options


def run(args: argparse.Namespace, stop: threading.Event | None = None) -> int:
    from sparrow_megatron.rollout.fleet import RolloutFleet

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    rollout, options = build_config(args)
    # SIGTERM (Slurm, systemd, kill) shuts the fleet down like Ctrl-C: no orphaned servers.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)
    fleet = RolloutFleet(rollout, options)
    print(
        f"starting {rollout.engines} SGLang engine(s) on {options.model_path}; logs in {fleet.run_dir}",
        flush=True,
    )
    try:
        fleet.start()
        for engine in fleet.engines:
            print(f"engine {engine.engine_id}: {engine.url} (pid {engine.server.pid})", flush=True)
        print("serving; Ctrl-C to stop", flush=True)
        (stop or threading.Event()).wait()
    except KeyboardInterrupt:
        print("stopping the fleet", flush=True)
    finally:
        fleet.shutdown()
    return 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
