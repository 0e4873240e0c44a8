import json

import pytest

from sparrow_megatron.errors import UserError
from sparrow_megatron.reward.code_reward import (
    CodeRewardConfig,
    call_matches,
    code_reward,
    extract_code,
    judge_program,
    load_tests,
    parse_tests,
    stdout_matches,
)
from sparrow_megatron.reward.sandbox import SandboxConfig, SandboxPool, isolation_available

pytestmark = pytest.mark.timeout(120)
needs_isolation = pytest.mark.skipif(
    not isolation_available(), reason="no isolation here (reward code --check)"
)
FAST = CodeRewardConfig(sandbox=SandboxConfig(timeout_s=3.0))
ADD_STDIO = {"inputs": ["1 2\n", "5 5\n", "0 0\n"], "outputs": ["3\n", "10", "0"]}


@needs_isolation
def test_stdio_cases_fraction_and_all_or_nothing():
    tests = parse_tests(ADD_STDIO)
    right = "a, b = map(int, input().split())\nprint(a + b)\n"
    wrong_on_equal = "a, b = map(int, input().split())\nprint(a + b + (a == b and a > 0))\n"
    assert judge_program(right, tests, FAST).reward == 1.0
    score = judge_program(wrong_on_equal, tests, FAST)
    assert (score.passed, score.total) == (2, 3)
    assert score.reward == pytest.approx(2 / 3)
    assert [c.status for c in score.cases] == ["ok", "wrong", "ok"]
    strict = CodeRewardConfig(all_or_nothing=True, sandbox=FAST.sandbox)
    strict_score = judge_program(wrong_on_equal, tests, strict)
    assert strict_score.reward == 0.0
    assert [c.status for c in strict_score.cases] == ["ok", "wrong"]  # stops at the first failure


@needs_isolation
def test_call_based_cases_with_function_and_solution_class():
    tests = parse_tests(
        {"fn_name": "add", "inputs": [[1, 2], [3, 4], [[1], [2]]], "outputs": [3, [7], [1, 2]]}
    )
    program = "def add(a, b):\n    print('noise on stdout is ignored')\n    return a + b\n"
    assert judge_program(program, tests, FAST).reward == 1.0
    leetcode = "class Solution:\n    def add(self, a, b):\n        return a + b\n"
    assert judge_program(leetcode, tests, FAST).reward == 1.0
    missing = judge_program("def other():\n    pass\n", tests, FAST)
    assert missing.reward == 0.0
    assert {c.status for c in missing.cases} == {"error"}


@needs_isolation
def test_failing_programs_are_judged_not_raised():
    tests = parse_tests(ADD_STDIO)
    with SandboxPool(FAST.sandbox, workers=2) as pool:
        crash = judge_program("raise ValueError('boom')", tests, FAST, pool)
        syntax = judge_program("def (:", tests, FAST, pool)
    assert crash.reward == syntax.reward == 0.0
    assert all(c.status == "error" and "ValueError" in c.detail for c in crash.cases)
    assert all(c.status == "error" and "SyntaxError" in c.detail for c in syntax.cases)


@needs_isolation
def test_per_case_timeout():
    tests = parse_tests({"inputs": ["1\n", "2\n"], "outputs": ["1", "2"]})
    program = "n = int(input())\nif n == 2:\n    while True:\n        pass\nprint(n)\n"
    score = judge_program(program, tests, CodeRewardConfig(sandbox=SandboxConfig(timeout_s=1.5)))
    assert [c.status for c in score.cases] == ["ok", "timeout"]
    assert score.reward == 0.5


@needs_isolation
def test_code_reward_extracts_last_fenced_block_after_thinking():
    response = (
        "<think>```python\nprint('draft')\n```</think>Here:\n```python\n"
        "a, b = map(int, input().split())\nprint(a + b)\n```"
    )
    assert extract_code(response).startswith("a, b")
    assert code_reward(response, parse_tests(ADD_STDIO), FAST).reward == 1.0
    no_code = code_reward("I cannot solve it", parse_tests(ADD_STDIO), FAST)
    assert (no_code.reward, no_code.reason) == (0.0, "no_code")


def test_output_comparison_rules():
    assert stdout_matches("3  \n\n", "3")
    assert stdout_matches("1 2\n3", "1 2 3")
    assert stdout_matches("0.3333333333", "0.333333333")
    assert not stdout_matches("3", "4")
    assert call_matches((1, 2), [1, 2])
    assert call_matches(5, [5])


def test_integers_exact_floats_within_tolerance():
    # Integer tokens are exact, at any length; float tokens (point, exponent, inf/nan) within tol.
    assert not stdout_matches("1999999", "2000000")
    assert stdout_matches("+007", "7") and stdout_matches("-0", "0")
    assert stdout_matches("9" * 5000, "9" * 5000) and not stdout_matches("9" * 5000, "9" * 4999 + "8")
    assert not stdout_matches("3.0", "3")  # an integer answer printed as a float is not that integer
    assert stdout_matches("2e-7", "0.0") and stdout_matches("1.0000000001e6", "1e6")
    assert not stdout_matches("0.31", "0.3")
    # Call results: booleans are not integers, integers are not near-integers, floats keep tol.
    assert not call_matches(True, 1) and not call_matches(1, True) and call_matches(True, [True])
    assert not call_matches(1999999, 2000000) and call_matches(2000000.0, 2000000)
    assert call_matches(0.1 + 0.2, 0.3) and not call_matches("0.3", 0.3) and not call_matches(None, 0)
    assert call_matches({"a": [1, 2.0000000001]}, {"a": [1, 2.0]}) and not call_matches({"a": 1}, {"b": 1})


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"inputs": ["1"]}, "outputs"),
        ({"inputs": ["1"], "outputs": ["1", "2"]}, "1 inputs but 2 outputs"),
        ({"inputs": [], "outputs": []}, "no test cases"),
        ({"inputs": [3], "outputs": ["3"]}, "inputs'[0]"),
        ({"fn_name": "not valid", "inputs": [[1]], "outputs": [1]}, "fn_name"),
        ({"fn_name": "f", "inputs": [1], "outputs": [1]}, "must be a list"),
        ("[1, 2", "not valid JSON"),
    ],
)
def test_broken_tests_raise_user_error_naming_the_field(obj, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_tests(obj, "t.json")


def test_load_tests_file(tmp_path):
    path = tmp_path / "tests.json"
    path.write_text(json.dumps(ADD_STDIO))
    assert load_tests(path).kind == "stdio"
    with pytest.raises(UserError, match="cannot read"):
        load_tests(tmp_path / "missing.json")


def test_a_judge_crash_is_a_counted_zero_and_only_refusal_raises(monkeypatch):
    from sparrow_megatron.reward import code_reward as module
    from sparrow_megatron.reward.sandbox import IsolationUnavailable, SandboxError, SandboxResult

    tests = parse_tests(ADD_STDIO)
    response = "```python\nprint(3)\n```"
    ok = SandboxResult("ok", 0, "3\n", "", 0.01)
    monkeypatch.setattr(module, "run_program", lambda **job: ok)
    assert code_reward(response, tests).passed == 1  # the stand-in runs: 1 of 3 cases print 3

    def crash(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")

    before = module.judge_error_counts().get("RecursionError", 0)
    monkeypatch.setattr(module, "_judge_case", crash)
    score = code_reward(response, tests)
    assert (score.reward, score.reason) == (0.0, "judge_error")
    assert {c.status for c in score.cases} == {"judge_error"}
    assert module.judge_error_counts()["RecursionError"] == before + 3

    def broken(**job):
        raise SandboxError("processes of sandbox uid 61000 survived SIGKILL")

    monkeypatch.setattr(module, "run_program", broken)
    assert code_reward(response, tests).reason == "judge_error"
    with SandboxPool(FAST.sandbox, workers=1) as pool:
        monkeypatch.setattr(pool, "submit", lambda **job: pool._executor.submit(broken, **job))
        assert judge_program("print(3)", tests, FAST, pool).reason == "judge_error"

    def refused(**job):
        raise IsolationUnavailable("code rewards refuse to run without isolation. Missing: user namespaces")

    monkeypatch.setattr(module, "run_program", refused)
    with pytest.raises(IsolationUnavailable, match="user namespaces"):
        code_reward(response, tests)
