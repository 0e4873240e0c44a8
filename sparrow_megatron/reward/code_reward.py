"""Code reward: run a program against TACO / APPS style test cases in the sandbox.

Two test formats, both JSON objects:
- stdin/stdout: `{"inputs": [stdin strings], "outputs": [expected stdout strings]}`
- call-based: `{"fn_name": name, "inputs": [[args]], "outputs": [value]}`; the function is a top-level
  def or a method of `class Solution` (LeetCode style). APPS often wraps the value in a one-element
  list; both forms are accepted.
Every case runs in its own sandbox (per-case timeout). Reward = fraction of cases passed, or 1/0 when
`all_or_nothing` (then the remaining cases are skipped after the first failure).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sparrow_megatron.errors import UserError, where
from sparrow_megatron.reward.sandbox import SandboxConfig, SandboxPool, SandboxResult, run_program

CASE_STATUSES = ("ok", "wrong", "timeout", "error", "killed")
RESULT_MARKER = "__SPARROW_RESULT__"

# Runs in the sandbox next to prog.py: imports it with its prints sent to stderr, calls the function
# on the arguments from args.json and prints the JSON result after a marker on the real stdout.
CALL_HARNESS = f"""
import contextlib, json, runpy, sys
with open("args.json") as f:
    spec = json.load(f)
with contextlib.redirect_stdout(sys.stderr):
    ns = runpy.run_path("prog.py", run_name="solution")
    fn = ns.get(spec["fn_name"])
    if fn is None and "Solution" in ns:
        fn = getattr(ns["Solution"](), spec["fn_name"], None)
    if fn is None:
        raise SystemExit("function " + spec["fn_name"] + " not defined")
    result = fn(*spec["args"])
print("{RESULT_MARKER}" + json.dumps(result, default=repr))
"""


@dataclass(frozen=True)
class TestCases:
    kind: str  # "stdio" or "call"
    inputs: list[Any]
    outputs: list[Any]
    fn_name: str | None = None

    def __len__(self) -> int:
        return len(self.inputs)


@dataclass(frozen=True)
class CodeRewardConfig:
    all_or_nothing: bool = False
    max_cases: int = 0  # 0 = all cases
    float_tolerance: float = 1e-6
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)


DEFAULT_CODE_CONFIG = CodeRewardConfig()


@dataclass
class CaseResult:
    status: str
    detail: str = ""
    wall_s: float = 0.0


@dataclass
class CodeScore:
    reward: float
    passed: int
    total: int
    cases: list[CaseResult]
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "reward": self.reward,
            "passed": self.passed,
            "total": self.total,
            "reason": self.reason,
            "cases": [asdict(c) for c in self.cases],
        }


def _text(value: Any, label: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    raise UserError(f"{label}: expected a string or a list of strings, got {type(value).__name__}")


def parse_tests(obj: Any, source: str = "tests") -> TestCases:
    """Validate a TACO/APPS test object; raises UserError naming the field or case that is broken."""
    if isinstance(obj, str):
        try:
            obj = json.loads(obj)
        except json.JSONDecodeError as err:
            raise UserError(f"{source}: not valid JSON: {err}") from err
    if not isinstance(obj, dict):
        raise UserError(f"{source}: expected a JSON object with 'inputs' and 'outputs'")
    for key in ("inputs", "outputs"):
        if not isinstance(obj.get(key), list):
            raise UserError(f"{where(source, field=key)}: missing or not a list")
    inputs, outputs = obj["inputs"], obj["outputs"]
    if len(inputs) != len(outputs):
        raise UserError(f"{source}: {len(inputs)} inputs but {len(outputs)} outputs")
    if not inputs:
        raise UserError(f"{where(source, field='inputs')}: no test cases")
    fn_name = obj.get("fn_name")
    if fn_name is None:
        ins = [_text(v, f"{where(source, field='inputs')}[{i}]") for i, v in enumerate(inputs)]
        outs = [_text(v, f"{where(source, field='outputs')}[{i}]") for i, v in enumerate(outputs)]
        return TestCases("stdio", ins, outs)
    if not isinstance(fn_name, str) or not fn_name.isidentifier():
        raise UserError(f"{where(source, field='fn_name')}: not a Python identifier: {fn_name!r}")
    for i, args in enumerate(inputs):
        if not isinstance(args, list):
            raise UserError(f"{where(source, field='inputs')}[{i}]: call-based arguments must be a list")
    return TestCases("call", inputs, outputs, fn_name)


def load_tests(path: str | Path) -> TestCases:
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read tests file: {err}") from err
    return parse_tests(text, str(path))


_FENCE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(response: str) -> str | None:
    """The last fenced code block of a model response (after any thinking), or None."""
    if "</think>" in response:
        response = response.rsplit("</think>", 1)[1]
    blocks = _FENCE.findall(response)
    return blocks[-1] if blocks else None


def _lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.strip().splitlines()]
    return lines


def _numbers_close(a: str, b: str, tol: float) -> bool:
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    return math.isclose(x, y, rel_tol=tol, abs_tol=tol)


def stdout_matches(actual: str, expected: str, tol: float = 1e-6) -> bool:
    """APPS-style comparison: line-trailing whitespace ignored, then tokens, then floats within tol."""
    if _lines(actual) == _lines(expected):
        return True
    got, want = actual.split(), expected.split()
    if len(got) != len(want):
        return False
    return all(g == w or _numbers_close(g, w, tol) for g, w in zip(got, want, strict=True))


def _normalize(value: Any) -> Any:
    return json.loads(json.dumps(value, default=repr))


def call_matches(result: Any, expected: Any, tol: float = 1e-6) -> bool:
    result, expected = _normalize(result), _normalize(expected)
    if result == expected or [result] == expected:
        return True
    if isinstance(result, float) and isinstance(expected, (int, float)) and not isinstance(expected, bool):
        return math.isclose(result, expected, rel_tol=tol, abs_tol=tol)
    return False


def _judge_case(res: SandboxResult, tests: TestCases, i: int, tol: float) -> CaseResult:
    if res.status != "ok":
        detail = res.reason or res.status
        if res.status == "error":
            detail += ": " + res.stderr.strip()[-300:]
        return CaseResult(res.status, detail, res.wall_s)
    if tests.kind == "stdio":
        ok = stdout_matches(res.stdout, tests.outputs[i], tol)
        return CaseResult("ok" if ok else "wrong", "" if ok else f"got {res.stdout[:200]!r}", res.wall_s)
    marker_lines = [line for line in res.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if not marker_lines:
        return CaseResult("error", "no result printed by the call harness", res.wall_s)
    try:
        value = json.loads(marker_lines[-1][len(RESULT_MARKER) :])
    except json.JSONDecodeError:
        return CaseResult("error", "unreadable result", res.wall_s)
    ok = call_matches(value, tests.outputs[i], tol)
    return CaseResult("ok" if ok else "wrong", "" if ok else f"got {json.dumps(value)[:200]}", res.wall_s)


def _job(source: str, tests: TestCases, i: int, config: CodeRewardConfig) -> dict[str, Any]:
    if tests.kind == "stdio":
        return {"source": source, "stdin": tests.inputs[i], "config": config.sandbox}
    args = json.dumps({"fn_name": tests.fn_name, "args": tests.inputs[i]})
    return {
        "source": source,
        "files": {"harness.py": CALL_HARNESS, "args.json": args},
        "args": ["harness.py"],
        "config": config.sandbox,
    }


def judge_program(
    source: str,
    tests: TestCases,
    config: CodeRewardConfig = CodeRewardConfig(),
    pool: SandboxPool | None = None,
) -> CodeScore:
    """Run every case of `tests` against `source`. A crash, a timeout or an attack is a 0 case, never
    an exception (only a broken sandbox raises SandboxError)."""
    n = len(tests) if not config.max_cases else min(len(tests), config.max_cases)
    cases: list[CaseResult] = []
    if config.all_or_nothing or pool is None:
        # Sequential: all-or-nothing stops at the first failure; no pool means no parallelism wanted.
        for i in range(n):
            res = run_program(**_job(source, tests, i, config))
            cases.append(_judge_case(res, tests, i, config.float_tolerance))
            if config.all_or_nothing and cases[-1].status != "ok":
                break
    else:
        results = pool.map([_job(source, tests, i, config) for i in range(n)])
        cases = [_judge_case(r, tests, i, config.float_tolerance) for i, r in enumerate(results)]
    passed = sum(c.status == "ok" for c in cases)
    reward = (1.0 if passed == n else 0.0) if config.all_or_nothing else passed / n
    return CodeScore(reward=reward, passed=passed, total=n, cases=cases)


def code_reward(
    response: str,
    tests: TestCases,
    config: CodeRewardConfig = CodeRewardConfig(),
    pool: SandboxPool | None = None,
) -> CodeScore:
    """Reward of a model response: its last fenced code block judged on `tests` (0, "no_code" if none)."""
    source = extract_code(response)
    if source is None:
        return CodeScore(reward=0.0, passed=0, total=len(tests), cases=[], reason="no_code")
    return judge_program(source, tests, config, pool)
