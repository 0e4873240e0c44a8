"""loop.overlap none vs one_step on the embedded default with two engines: the timeline and the ratio.

    python bench/overlap.py                       # 6 steps each, 2 engines, the embedded default
    python bench/overlap.py --steps 8 --engines 2 --out bench/results/overlap

Runs `sparrow train` twice (same seed, prompts and schedule; only loop.overlap differs) and reads each
run's metrics.jsonl: per step the wall time (time/step_s), the trainer's phases (score, tails, update,
sync, and the wait for the rollout), the rollout side's busy time (time/rollout_generate_s and, under
one_step, time/rollout_dense_ref_s: the engines' dense reference) and time/overlap_frac. Step 1 of both
modes is sequential (there is no previous update to overlap with) and carries start-up effects, so the
means are over steps 2..N. On a 2-core CPU machine the trainer and the engines compete for the same cores:
the ratio reported here is a measurement of that machine, not the cluster's gain (docs/benchmarks.md
predicts that from the phase times). Writes JSON and a markdown table (--out, default
bench/results/overlap.{json,md}).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAINER = ("time/score_s", "time/tails_s", "time/update_s", "time/rollout_wait_s", "time/sync_s")
ROLLOUT = ("time/rollout_generate_s", "time/rollout_dense_ref_s")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--engines", type=int, default=2)
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "overlap"))
    p.add_argument("overrides", nargs="*", help="more key=value overrides for both runs")
    return p.parse_args(argv)


def run_mode(mode: str, args, root: Path) -> list[dict]:
    run_dir = root / mode
    cmd = [
        sys.executable, "-m", "sparrow_megatron.cli.main", "train",
        f"loop.steps={args.steps}", f"loop.prompts_per_step={args.prompts_per_step}",
        f"rollout.n_samples={args.samples}", f"rollout.engines={args.engines}", "loop.eval_every=0",
        "loop.checkpoint_every=0", f"loop.overlap={mode}", f"loop.run_dir={run_dir}", *args.overrides,
    ]  # fmt: skip
    print("+", shlex.join(cmd), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"{mode}: sparrow train failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return [r for r in rows if "eval/n" not in r]


def mean(rows: list[dict], key: str) -> float:
    values = [r.get(key, 0.0) for r in rows]
    return sum(values) / len(values) if values else 0.0


def summarize(rows: list[dict]) -> dict:
    later = rows[1:]  # step 1 is sequential in both modes
    return {
        "step_s": mean(later, "time/step_s"),
        "trainer_s": {k: mean(later, k) for k in TRAINER},
        "rollout_s": {k: mean(later, k) for k in ROLLOUT},
        "overlap_frac": mean(later[:-1], "time/overlap_frac"),  # the last step prefetches nothing
        "reward": [r["reward/mean"] for r in rows],
        "timeline": [
            {
                k: r.get(k)
                for k in (
                    "step",
                    "time/step_s",
                    *TRAINER,
                    *ROLLOUT,
                    "time/overlap_frac",
                    "rollout/batch_weight_version",
                    "rollout/policy_lag",
                )
            }  # fmt: skip
            for r in rows
        ],
    }


def versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {"python": platform.python_version(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    for pkg in ("torch", "sglang", "megatron-core"):
        try:
            out[pkg] = version(pkg)
        except Exception:
            out[pkg] = "?"
    try:
        out["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        out["commit"] = "?"
    return out


def markdown(result: dict) -> str:
    none, one = result["none"], result["one_step"]
    lines = [
        f"loop.overlap none vs one_step, {result['steps']} steps, {result['engines']} engines "
        f"({result['date']}; {', '.join(f'{k} {v}' for k, v in result['versions'].items())})",
        "",
        "| mode | step s (steps 2..N) | score | tails | update | wait for rollout | sync | "
        "rollout generate | dense ref | overlap frac |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in (("none", none), ("one_step", one)):
        t, r = s["trainer_s"], s["rollout_s"]
        lines.append(
            f"| {name} | {s['step_s']:.2f} | " + " | ".join(f"{t[k]:.2f}" for k in TRAINER) + " | "
            + " | ".join(f"{r[k]:.2f}" for k in ROLLOUT) + f" | {s['overlap_frac']:.2f} |"
        )  # fmt: skip
    lines += [
        "",
        f"one_step / none step time: {result['ratio']:.2f}",
        f"reward per step, none: {[round(x, 3) for x in none['reward']]}",
        f"reward per step, one_step: {[round(x, 3) for x in one['reward']]}",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="overlap-bench-") as tmp:
        runs = {mode: summarize(run_mode(mode, args, Path(tmp))) for mode in ("none", "one_step")}
    result = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "versions": versions(),
        "steps": args.steps,
        "engines": args.engines,
        **runs,
        "ratio": runs["one_step"]["step_s"] / max(runs["none"]["step_s"], 1e-9),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
