"""`sparrow submit|status|logs|cancel`: a recipe (or a LaunchSpec) on Slurm or locally, through NeMo-Run."""

from __future__ import annotations

import argparse
import os

from sparrow_megatron.launch.spec import SlurmSettings

DEFAULT_JOB_DIR = os.environ.get("SPARROW_JOB_DIR", SlurmSettings.job_dir)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("submit", help="validate a recipe and submit it (Slurm het job or local)")
    p.add_argument(
        "spec",
        help="a recipe (recipe() -> JobConfig, or YAML/JSON), or a LaunchSpec file/module (SPEC, spec())",
    )
    p.add_argument("overrides", nargs="*", help="key=value, e.g. trainer.tp=4 cluster.account=myacct")
    p.add_argument("--executor", choices=["slurm", "local"], help="override the spec's executor")
    p.add_argument("--dry-run", action="store_true", help="write the sbatch script, submit nothing")
    p.set_defaults(func=cmd_submit)

    for name, func, text in [
        ("status", cmd_status, "state of a submitted experiment"),
        ("logs", cmd_logs, "print the log files of a submitted experiment"),
        ("cancel", cmd_cancel, "cancel a submitted experiment"),
    ]:
        q = subparsers.add_parser(name, help=text)
        q.add_argument("experiment_id", help="the id `sparrow submit` printed (<name>_<number>)")
        q.add_argument(
            "--job-dir", default=DEFAULT_JOB_DIR, help=f"where experiments live [{DEFAULT_JOB_DIR}]"
        )
        q.set_defaults(func=func)


def load_launch_spec(source: str, overrides: list[str], executor: str | None):
    """A job recipe (`recipe() -> JobConfig`, YAML/JSON) or a LaunchSpec file, overridden and validated."""
    from sparrow_megatron.launch.job import is_job_recipe
    from sparrow_megatron.launch.spec import apply_overrides, load_spec, validate

    if is_job_recipe(source):
        from sparrow_megatron.config import load_config
        from sparrow_megatron.launch.job import launch_spec

        overrides = overrides + ([f"cluster.executor={executor}"] if executor else [])
        cfg = load_config(source, overrides)  # every field and path, before anything is submitted
        return validate(launch_spec(cfg, source, overrides))
    overrides = overrides + ([f"executor={executor}"] if executor else [])
    return validate(apply_overrides(load_spec(source), overrides))


def cmd_submit(args: argparse.Namespace) -> int:
    from sparrow_megatron.launch import jobs

    spec = load_launch_spec(args.spec, list(args.overrides), args.executor)
    sub = jobs.submit(spec, dry_run=args.dry_run)
    print(f"experiment: {sub.experiment_id}")
    print(f"job dir:    {spec.cluster.job_dir}")
    print(f"run dir:    {spec.run_dir}")
    if sub.sbatch_script:
        print(f"sbatch:     {sub.sbatch_script}")
    if not sub.dry_run and spec.executor == "slurm":  # a local run has finished by now
        print(f"watch:      sparrow status {sub.experiment_id} --job-dir {spec.cluster.job_dir}")
    return 0


def _print_states(states) -> None:
    for s in states:
        print(f"{s.name}\t{s.state.name}\tslurm job {s.slurm_job_id or '-'}\t{s.local_dir}")


def cmd_status(args: argparse.Namespace) -> int:
    from sparrow_megatron.launch import jobs

    _print_states(jobs.status(args.experiment_id, args.job_dir))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from sparrow_megatron.launch import jobs

    for path, text in jobs.logs(args.experiment_id, args.job_dir).items():
        print(f"==> {path} <==")
        print(text)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from sparrow_megatron.launch import jobs

    _print_states(jobs.cancel(args.experiment_id, args.job_dir))
    return 0
