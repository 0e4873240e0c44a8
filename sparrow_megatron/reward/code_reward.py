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
import secrets
import threading
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sparrow_megatron.errors import UserError, where
from sparrow_megatron.reward.config import RewardConfig
from sparrow_megatron.reward.sandbox import (
    MIB,
    IsolationUnavailable,
    SandboxConfig,
    SandboxPool,
    SandboxResult,
    run_program,
)

CASE_STATUSES = ("ok", "wrong", "timeout", "error", "killed", "judge_error")
RESULT_MARKER = "__SPARROW_RESULT__"
MAX_RESULT_BYTES = 1 << 20  # a call result line longer than this is not read
MAX_RESULT_DEPTH = 64  # nor one nested deeper (json and comparisons recurse)
LONG_INT_DIGITS = 4000  # Python refuses int() past 4300 digits; longer ones compare as digit strings

# Runs in the sandbox next to prog.py. The program runs in a forked child, with stdin closed and its
# prints sent to stderr, and hands its result to the parent through a pipe. The parent, made
# non-dumpable first (so the child cannot read its memory or fds through /proc), reads the run's nonce
# from stdin only after the fork: the program never holds it, so a result line it prints itself is
# ignored by the judge. The parent prints `MARKER NONCE JSON` on stdout.
CALL_HARNESS = f"""
import json, os, sys
try:
    import ctypes
    ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 0
except Exception:  # the unsafe mode's audit hook refuses ctypes: it promises nothing anyway
    pass
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    import contextlib, runpy
    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(0)  # arguments and answers may be 5,000-digit integers
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
    data = json.dumps(result, default=repr).encode()
    with os.fdopen(w, "wb") as out:
        out.write(data)
    sys.stderr.flush()
    os._exit(0)
os.close(w)
nonce = sys.stdin.readline().strip()
os.close(0)
with os.fdopen(r, "rb") as f:
    data = f.read({MAX_RESULT_BYTES} + 1)
if len(data) > {MAX_RESULT_BYTES}:
    sys.exit("result longer than {MAX_RESULT_BYTES} bytes")
_, status = os.waitpid(pid, 0)
if os.WIFSIGNALED(status):
    sys.exit("program killed by signal " + str(os.WTERMSIG(status)))
if os.WEXITSTATUS(status) != 0:
    sys.exit(os.WEXITSTATUS(status))
sys.stdout.write("{RESULT_MARKER} " + nonce + " " + data.decode("utf-8", "replace") + "\\n")
"""

_ERRORS_LOCK = threading.Lock()
_JUDGE_ERRORS: Counter[str] = Counter()


def judge_error_counts() -> dict[str, int]:
    """Judge crashes since start, by reason (each gave its case reward 0): for the step's metrics."""
    with _ERRORS_LOCK:
        return dict(_JUDGE_ERRORS)


def _count_judge_error(err: BaseException) -> str:
    reason = type(err).__name__
    with _ERRORS_LOCK:
        _JUDGE_ERRORS[reason] += 1
    return f"judge error ({reason}): {str(err)[:200]}"


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

    @classmethod
    def from_section(cls, reward: RewardConfig) -> CodeRewardConfig:
        """What the job config's `reward` section asks of the code reward and its sandbox."""
        sandbox = SandboxConfig(
            timeout_s=reward.timeout_s,
            memory_mb=reward.memory_mb,
            max_processes=reward.max_processes,
            tmpfs_mb=reward.tmpfs_mb,
            max_output_bytes=reward.max_output_mb * MIB,
            isolation=reward.isolation,
            cgroup_parent=reward.cgroup_parent,
        )
        return cls(reward.all_or_nothing, reward.max_cases, reward.float_tolerance, sandbox)


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
            obj = loads(obj)
        except ValueError as err:
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


class LongInt(str):
    """An integer literal too long for int() (past LONG_INT_DIGITS digits): compared as its digits."""


def _parse_int(text: str) -> int | LongInt:
    return LongInt(text) if len(text) > LONG_INT_DIGITS else int(text)


def loads(text: str) -> Any:
    """json.loads that keeps integers of any length (as LongInt) instead of raising on them."""
    return json.loads(text, parse_int=_parse_int)


def dumps(value: Any) -> str:
    """json.dumps that writes LongInt back as the integer it is (not as a string)."""
    if isinstance(value, LongInt):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(dumps(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {dumps(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip().splitlines()]


_INT_TOKEN = re.compile(r"[+-]?\d+")
_FLOAT_TOKEN = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+(\.\d*)?[eE][+-]?\d+|\d*\.\d+[eE][+-]?\d+|inf|nan)", re.I)


def _int_digits(token: str) -> str:
    sign = "-" if token.startswith("-") else ""
    digits = token.lstrip("+-").lstrip("0") or "0"
    return ("" if digits == "0" else sign) + digits


def _tokens_match(got: str, want: str, tol: float) -> bool:
    if got == want:
        return True
    if _INT_TOKEN.fullmatch(want):
        # An integer is exact: 1999999 is not 2000000 however close; +7 and 007 are 7. Compared as
        # digit strings, so any length works.
        return _INT_TOKEN.fullmatch(got) is not None and _int_digits(got) == _int_digits(want)
    if _FLOAT_TOKEN.fullmatch(want):
        try:
            x, y = float(got), float(want)
        except ValueError:
            return False
        return x == y or math.isclose(x, y, rel_tol=tol, abs_tol=tol)
    return False


def stdout_matches(actual: str, expected: str, tol: float = 1e-6) -> bool:
    """APPS-style comparison: line-trailing whitespace ignored, then token by token. A token of the
    expected output that is an integer must match exactly; only a float token (with a point or an
    exponent, or inf/nan) is compared within `tol` (relative and absolute)."""
    if _lines(actual) == _lines(expected):
        return True
    got, want = actual.split(), expected.split()
    if len(got) != len(want):
        return False
    return all(_tokens_match(g, w, tol) for g, w in zip(got, want, strict=True))


def values_match(got: Any, want: Any, tol: float = 1e-6) -> bool:
    """Exact where the expected value is exact: booleans only equal booleans (True is not 1),
    integers equal integers of the same value (or a float of exactly that value), strings and None
    exactly; a float expected allows `tol`. Lists (tuples) and dicts element by element."""
    if isinstance(want, bool) or isinstance(got, bool):
        return isinstance(want, bool) and isinstance(got, bool) and got == want
    if isinstance(want, LongInt) or isinstance(got, LongInt):
        return (
            isinstance(want, LongInt) and isinstance(got, LongInt) and _int_digits(got) == _int_digits(want)
        )
    if isinstance(want, float):
        if not isinstance(got, (int, float)):
            return False
        return got == want or math.isclose(got, want, rel_tol=tol, abs_tol=tol)
    if isinstance(want, int):
        return isinstance(got, (int, float)) and got == want
    if isinstance(want, str) or want is None:
        return type(got) is type(want) and got == want
    if isinstance(want, (list, tuple)):
        return (
            isinstance(got, (list, tuple))
            and len(got) == len(want)
            and all(values_match(g, w, tol) for g, w in zip(got, want, strict=True))
        )
    if isinstance(want, dict):
        return (
            isinstance(got, dict)
            and got.keys() == want.keys()
            and all(values_match(got[k], want[k], tol) for k in want)
        )
    return False


def call_matches(result: Any, expected: Any, tol: float = 1e-6) -> bool:
    """A call result against the expected value, also accepting APPS's one-element list wrapping."""
    if values_match(result, expected, tol):
        return True
    return isinstance(expected, list) and len(expected) == 1 and values_match(result, expected[0], tol)


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def _depth(text: str) -> int:
    depth = deepest = 0
    for ch in _JSON_STRING.sub("", text):
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def parse_result(stdout: str, nonce: str) -> tuple[Any, str]:
    """(value, "") from the harness's result line carrying this run's nonce, or (None, why not).
    Bounded: one line, at most MAX_RESULT_BYTES, nested at most MAX_RESULT_DEPTH, any int length."""
    prefix = f"{RESULT_MARKER} {nonce} "
    lines = [line for line in stdout.splitlines() if line.startswith(prefix)]
    if len(lines) != 1:
        return None, "no result printed by the call harness" if not lines else "several result lines"
    text = lines[0][len(prefix) :]
    if len(text) > MAX_RESULT_BYTES:
        return None, "result line too long"
    if _depth(text) > MAX_RESULT_DEPTH:
        return None, f"result nested deeper than {MAX_RESULT_DEPTH}"
    try:
        return loads(text), ""
    except (ValueError, RecursionError):
        return None, "unreadable result"


def _brief(value: Any) -> str:
    try:
        return json.dumps(value)[:200]
    except (ValueError, TypeError, RecursionError):
        return repr(value)[:200]


def _judge_case(res: SandboxResult, tests: TestCases, i: int, tol: float, nonce: str) -> CaseResult:
    if res.status != "ok":
        detail = res.reason or res.status
        if res.status == "error":
            detail += ": " + res.stderr.strip()[-300:]
        return CaseResult(res.status, detail, res.wall_s)
    if tests.kind == "stdio":
        ok = stdout_matches(res.stdout, tests.outputs[i], tol)
        return CaseResult("ok" if ok else "wrong", "" if ok else f"got {res.stdout[:200]!r}", res.wall_s)
    value, problem = parse_result(res.stdout, nonce)
    if problem:
        return CaseResult("error", problem, res.wall_s)
    ok = call_matches(value, tests.outputs[i], tol)
    return CaseResult("ok" if ok else "wrong", "" if ok else f"got {_brief(value)}", res.wall_s)


def _job(source: str, tests: TestCases, i: int, config: CodeRewardConfig) -> tuple[dict[str, Any], str]:
    """The run_program arguments of case i, and the nonce its result line must carry."""
    if tests.kind == "stdio":
        return {"source": source, "stdin": tests.inputs[i], "config": config.sandbox}, ""
    nonce = secrets.token_hex(16)
    args = dumps({"fn_name": tests.fn_name, "args": tests.inputs[i]})
    job = {
        "source": source,
        "stdin": nonce + "\n",
        "files": {"harness.py": CALL_HARNESS, "args.json": args},
        "args": ["harness.py"],
        "config": config.sandbox,
    }
    return job, nonce


def _safe_case(get_result, tests: TestCases, i: int, tol: float, nonce: str) -> CaseResult:
    """One case's judgment; anything failing inside the judge or the sandbox is a counted 0 case.
    Only IsolationUnavailable goes up: without isolation code rewards refuse to run at all."""
    try:
        return _judge_case(get_result(), tests, i, tol, nonce)
    except IsolationUnavailable:
        raise
    except Exception as err:  # noqa: BLE001 - no program output may stop the training step
        return CaseResult("judge_error", _count_judge_error(err))


def judge_program(
    source: str,
    tests: TestCases,
    config: CodeRewardConfig = CodeRewardConfig(),
    pool: SandboxPool | None = None,
) -> CodeScore:
    """Run every case of `tests` against `source`. A crash, a timeout, an attack, or a failure of the
    judge itself is a 0 case, never an exception; only IsolationUnavailable (the machine cannot
    isolate programs and isolation is not explicitly `unsafe`) raises."""
    n = len(tests) if not config.max_cases else min(len(tests), config.max_cases)
    tol = config.float_tolerance
    cases: list[CaseResult] = []
    if config.all_or_nothing or pool is None:
        # Sequential: all-or-nothing stops at the first failure; no pool means no parallelism wanted.
        for i in range(n):
            job, nonce = _job(source, tests, i, config)
            cases.append(_safe_case(lambda job=job: run_program(**job), tests, i, tol, nonce))
            if config.all_or_nothing and cases[-1].status != "ok":
                break
    else:
        jobs = [_job(source, tests, i, config) for i in range(n)]
        futures = [pool.submit(**job) for job, _ in jobs]
        cases = [
            _safe_case(f.result, tests, i, tol, nonce)
            for i, (f, (_, nonce)) in enumerate(zip(futures, jobs, strict=True))
        ]
    passed = sum(c.status == "ok" for c in cases)
    reward = (1.0 if passed == n else 0.0) if config.all_or_nothing else passed / n
    reason = "judge_error" if any(c.status == "judge_error" for c in cases) else ""
    return CodeScore(reward=reward, passed=passed, total=n, cases=cases, reason=reason)


def code_reward(
    response: str,
    tests: TestCases,
    config: CodeRewardConfig = CodeRewardConfig(),
    pool: SandboxPool | None = None,
) -> CodeScore:
    """Reward of a model response (what the training loop calls for code samples): its last fenced
    code block judged on `tests`; 0 with reason "no_code" if none, 0 with "judge_error" if the judge
    failed. Raises only IsolationUnavailable (refusal to run unisolated)."""
    try:
        source = extract_code(response)
        if source is None:
            return CodeScore(reward=0.0, passed=0, total=len(tests), cases=[], reason="no_code")
        return judge_program(source, tests, config, pool)
    except IsolationUnavailable:
        raise
    except Exception as err:  # noqa: BLE001
        detail = _count_judge_error(err)
        return CodeScore(
            reward=0.0,
            passed=0,
            total=len(tests),
            cases=[CaseResult("judge_error", detail)],
            reason="judge_error",
        )
