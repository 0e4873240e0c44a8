"""`sparrow reward math|code`: judge one response or program, for users debugging their rewards.

Exit 0 whenever a judgment was made (a wrong, failing or malicious program is a judgment); exit 2 for
bad arguments or an unreadable file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sparrow_megatron.errors import UserError
from sparrow_megatron.reward.config import ISOLATION_MODES  # the job config's list (a light import)


def register(subparsers) -> None:
    p = subparsers.add_parser("reward", help="compute a math or code reward for one response")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")

    m = kinds.add_parser("math", help="1/0 from the last \\boxed{} of a response (math-verify)")
    m.add_argument("--response", required=True, metavar="FILE", help="file with the model response")
    m.add_argument("--answer", required=True, metavar="TEXT", help="ground-truth answer, e.g. '\\frac{1}{2}'")
    m.add_argument("--json", action="store_true", help="print the result as JSON")
    m.set_defaults(func=run_math)

    c = kinds.add_parser("code", help="run a program on TACO/APPS test cases in the sandbox")
    c.add_argument("program", nargs="?", metavar="PROGRAM.py", help="the program to judge (runs sandboxed)")
    c.add_argument("--tests", metavar="TESTS.json", help="stdin/stdout or call-based tests")
    c.add_argument("--timeout", type=float, default=5.0, help="seconds per test case (default 5)")
    c.add_argument("--memory-mb", type=int, default=1024, help="memory per test case run (default 1024)")
    c.add_argument("--all-or-nothing", action="store_true", help="reward 1 only if every case passes")
    c.add_argument("--workers", type=int, default=0, help="parallel sandboxes (default: half the cores)")
    c.add_argument(
        "--isolation",
        choices=ISOLATION_MODES,
        default="bwrap",
        help="bwrap (default; refuses to run if the machine cannot isolate) or unsafe (no isolation)",
    )
    c.add_argument("--check", action="store_true", help="report which isolation this machine gives, and exit")
    c.add_argument("--json", action="store_true", help="print the result as JSON")
    c.set_defaults(func=run_code)


def printable(text: str) -> str:
    """`text` with every non-printable character escaped (\\x1b, \\u202e, \\n...): what a program printed
    may be echoed to a terminal, never interpreted by it."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def _read(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read {what}: {err}") from err


def run_math(args) -> int:
    from sparrow_megatron.reward.math_reward import math_reward

    if not args.answer.strip():
        raise UserError("--answer is empty")
    score = math_reward(_read(args.response, "response"), args.answer)
    if args.json:
        print(json.dumps(score.to_dict()))
    else:
        print(f"reward {int(score.reward)} ({score.reason}); extracted: {score.extracted!r}")
    return 0


def run_check(args) -> int:
    from sparrow_megatron.reward.isolation_check import check_isolation
    from sparrow_megatron.reward.sandbox import SandboxConfig

    report = check_isolation(SandboxConfig(timeout_s=args.timeout))
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        verdict = (
            "bwrap: programs are isolated"
            if report.isolation == "bwrap"
            else ("none: code rewards refuse to run here (unless reward.isolation=unsafe)")
        )
        print(f"isolation: {verdict}")
        for item in report.items:
            print(f"  [{'ok' if item.ok else '--'}] {item.name}: {item.detail}")
    return 0 if report.isolation == "bwrap" else 1


def run_code(args) -> int:
    from sparrow_megatron.reward.code_reward import CodeRewardConfig, judge_program, load_tests
    from sparrow_megatron.reward.sandbox import SandboxConfig, SandboxError, SandboxPool

    if args.timeout <= 0:
        raise UserError(f"--timeout must be positive, got {args.timeout}")
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    if args.memory_mb < 16:
        raise UserError(f"--memory-mb must be >= 16, got {args.memory_mb}")
    if args.check:
        return run_check(args)
    if not args.program or not args.tests:
        raise UserError("sparrow reward code: give PROGRAM.py and --tests TESTS.json (or --check)")
    source = _read(args.program, "program")
    tests = load_tests(args.tests)
    config = CodeRewardConfig(
        all_or_nothing=args.all_or_nothing,
        sandbox=SandboxConfig(timeout_s=args.timeout, memory_mb=args.memory_mb, isolation=args.isolation),
    )
    try:
        with SandboxPool(config.sandbox, workers=args.workers or None) as pool:
            score = judge_program(source, tests, config, pool)
    except SandboxError as err:  # the machine cannot sandbox: not a judgment, not a user mistake
        print(f"sparrow reward code: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(score.to_dict()))  # JSON escapes control characters itself
    else:
        print(f"reward {score.reward:.3f}: {score.passed}/{score.total} cases passed")
        for i, case in enumerate(score.cases):
            detail = f" ({printable(case.detail[:120])})" if case.detail else ""
            print(f"  case {i}: {case.status}{detail}")
    return 0
