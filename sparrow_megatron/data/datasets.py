"""Loaders for the dataset files users bring: math (problem + answer) and code (problem + tests).

Math: Polaris / DeepScaleR (`problem`, `answer`), DAPO (`prompt` as chat messages,
`reward_model.ground_truth`), AIME / AMC evaluation files (`Problem`/`problem`, `Answer`/`answer`,
numbers allowed), as JSONL, JSON (a list of rows) or parquet. Code: TACO / APPS rows (`question`,
`input_output` as a JSON string or object) and LiveCodeBench rows (`question_content`,
`public_test_cases` as a JSON list of {input, output, testtype: stdin}). A column mapping (dotted paths for nested fields) handles
other schemas. Local files only.

Malformed rows (missing answer, empty prompt, wrong types, broken test cases) are skipped, counted by
reason and logged; a file that cannot be read at all raises UserError naming it.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparrow_megatron.errors import UserError, where

log = logging.getLogger(__name__)

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
PROBLEM_KEYS = ("problem", "Problem", "question", "Question", "question_content", "prompt")
ANSWER_KEYS = ("answer", "Answer", "final_answer", "ground_truth", "reward_model.ground_truth")
ID_KEYS = ("id", "ID", "idx", "problem_id", "extra_info.index")
CODE_TESTS_KEYS = ("input_output", "tests", "test_cases", "public_test_cases")
MAX_LOGGED_SKIPS = 5


class SkipRow(Exception):
    """A malformed row: skipped and counted under `reason`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason


@dataclass(frozen=True)
class DatasetConfig:
    path: str = ""
    format: str = "auto"  # jsonl | json | parquet | auto (by suffix)
    problem_key: str | None = None  # None: the first of PROBLEM_KEYS present in the row
    answer_key: str | None = None  # None: the first of ANSWER_KEYS present (math)
    tests_key: str | None = None  # None: the first of CODE_TESTS_KEYS present (code)
    id_key: str | None = None
    instruction: str = MATH_INSTRUCTION  # appended to every math problem ("" for none)
    limit: int = 0  # 0 = all rows


@dataclass
class LoadReport:
    path: str
    rows: int = 0
    loaded: int = 0
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"{self.path}: {self.loaded}/{self.rows} rows loaded, skipped: {reasons}"


@dataclass(frozen=True)
class MathExample:
    id: str
    problem: str
    answer: str
    source: str  # file:row, for error messages and tracking
    instruction: str = MATH_INSTRUCTION

    @property
    def messages(self) -> list[dict[str, str]]:
        content = f"{self.problem}\n\n{self.instruction}" if self.instruction else self.problem
        return [{"role": "user", "content": content}]

    def prompt_text(self, tokenizer: Any, **template_kwargs: Any) -> str:
        """The prompt with the model's chat template (e.g. Qwen3's; `enable_thinking=...` passes through)."""
        return tokenizer.apply_chat_template(
            self.messages, tokenize=False, add_generation_prompt=True, **template_kwargs
        )


@dataclass(frozen=True)
class CodeExample:
    id: str
    problem: str
    tests: Any  # sparrow_megatron.reward.code_reward.TestCases
    source: str

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.problem}]

    def prompt_text(self, tokenizer: Any, **template_kwargs: Any) -> str:
        return tokenizer.apply_chat_template(
            self.messages, tokenize=False, add_generation_prompt=True, **template_kwargs
        )


def load_tokenizer(model_dir: str | Path):
    """The tokenizer (with its chat template) from a local model directory; no hub access."""
    from transformers import AutoTokenizer

    path = Path(model_dir)
    if not (path / "tokenizer_config.json").is_file() and not (path / "tokenizer.json").is_file():
        raise UserError(f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json) in model dir")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot load tokenizer: {err}") from err
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{path}: tokenizer has no chat template")
    return tokenizer


def _format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        return "json"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise UserError(
        f"{path}: unknown dataset format (suffix {suffix!r}); set format to jsonl, json or parquet"
    )


def read_rows(path: str | Path, fmt: str = "auto", report: LoadReport | None = None):
    """Yield (row_number, row) from a JSONL / JSON / parquet file. Bad JSONL lines are skipped."""
    path = Path(path)
    fmt = _format(path, fmt)
    if not path.is_file():
        raise UserError(f"{path}: dataset file not found")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as err:  # noqa: BLE001 - pyarrow raises many types for a bad file
            raise UserError(f"{path}: cannot read parquet: {err}") from err
        yield from enumerate(rows, start=1)
        return
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read: {err}") from err
    if fmt == "json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not valid JSON: {err}") from err
        if isinstance(rows, dict):  # {"data": [...]} style wrappers
            lists = [v for v in rows.values() if isinstance(v, list)]
            rows = lists[0] if len(lists) == 1 else None
        if not isinstance(rows, list):
            raise UserError(f"{path}: expected a JSON list of rows")
        yield from enumerate(rows, start=1)
        return
    if fmt != "jsonl":
        raise UserError(f"{path}: unknown format {fmt!r}")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            _skip(report, path, number, SkipRow("invalid_json", str(err)))
            continue
        yield number, row


def _get(row: dict, key: str) -> Any:
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _pick(row: dict, explicit: str | None, candidates: tuple[str, ...]) -> tuple[str | None, Any]:
    if explicit:
        return explicit, _get(row, explicit)
    for key in candidates:
        value = _get(row, key)
        if value is not None:
            return key, value
    return None, None


def _problem_text(value: Any) -> str:
    if isinstance(value, list):  # chat messages (DAPO): the last user turn
        users = [m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "user"]
        value = users[-1] if users else None
    if not isinstance(value, str):
        raise SkipRow("bad_problem_type", f"problem is {type(value).__name__}, not text")
    if not value.strip():
        raise SkipRow("empty_problem")
    return value


def _answer_text(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        raise SkipRow("missing_answer" if value is None else "bad_answer_type")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SkipRow("bad_answer_type", "non-finite number")
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, list) and len(value) == 1:  # some files wrap the answer in a list
        return _answer_text(value[0])
    if not isinstance(value, str):
        raise SkipRow("bad_answer_type", f"answer is {type(value).__name__}")
    if not value.strip():
        raise SkipRow("missing_answer", "empty answer")
    return value.strip()


def _skip(report: LoadReport | None, path: Path, number: int, err: SkipRow) -> None:
    if report is not None:
        report.skipped[err.reason] += 1
        if sum(report.skipped.values()) > MAX_LOGGED_SKIPS:
            return
    log.warning("%s: skipped row (%s): %s", where(path, number), err.reason, err)


def _rows(config: DatasetConfig, report: LoadReport):
    path = Path(config.path)
    for number, row in read_rows(path, config.format, report):
        if config.limit and report.loaded >= config.limit:
            break
        report.rows += 1
        if not isinstance(row, dict):
            _skip(report, path, number, SkipRow("not_an_object", f"row is {type(row).__name__}"))
            continue
        yield number, row


def _load(config: DatasetConfig, build: Callable[[dict, str, str, str], Any]) -> tuple[list, LoadReport]:
    """The row loop both kinds share: `build(row, id, problem, source)` makes an example or raises
    SkipRow, which is logged and counted; everything else about a row is the same for every kind."""
    path = Path(config.path)
    report = LoadReport(str(path))
    examples = []
    for number, row in _rows(config, report):
        try:
            _, problem = _pick(row, config.problem_key, PROBLEM_KEYS)
            if problem is None:
                raise SkipRow("missing_problem")
            _, ident = _pick(row, config.id_key, ID_KEYS)
            ident = str(ident) if ident is not None else f"{path.stem}-{number}"
            examples.append(build(row, ident, _problem_text(problem), where(path, number)))
        except SkipRow as err:
            _skip(report, path, number, err)
            continue
        report.loaded += 1
    _finish(report)
    return examples, report


def load_math_dataset(config: DatasetConfig) -> tuple[list[MathExample], LoadReport]:
    """Math examples from a local file, plus a report of what was skipped and why."""

    def build(row: dict, ident: str, problem: str, source: str) -> MathExample:
        _, answer = _pick(row, config.answer_key, ANSWER_KEYS)
        return MathExample(ident, problem, _answer_text(answer), source, instruction=config.instruction)

    return _load(config, build)


def load_code_dataset(config: DatasetConfig) -> tuple[list[CodeExample], LoadReport]:
    """Code examples (TACO / APPS rows) with validated test cases; rows with broken tests are skipped."""
    from sparrow_megatron.reward.code_reward import parse_tests

    def build(row: dict, ident: str, problem: str, source: str) -> CodeExample:
        _, tests = _pick(row, config.tests_key, CODE_TESTS_KEYS)
        if tests is None:
            raise SkipRow("missing_tests")
        try:
            cases = parse_tests(_case_list_tests(tests), source)
        except UserError as err:
            raise SkipRow("broken_tests", str(err)) from err
        return CodeExample(ident, problem, cases, source)

    return _load(config, build)


def fit_prompts(examples: list, report: LoadReport, tokenizer: Any, max_tokens: int, refuse: bool) -> list:
    """The examples whose chat-formatted prompt fits `max_tokens` (data.max_prompt_tokens). Longer
    ones are skipped and counted as `prompt_too_long` in the report, or, with `refuse`, raise UserError
    naming the first of them (file:row) and how many there are."""
    texts = [ex.prompt_text(tokenizer) for ex in examples]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
    long = [(ex, n) for ex, n in zip(examples, lengths, strict=True) if n > max_tokens]
    if not long:
        return examples
    first, n = long[0]
    if refuse:
        raise UserError(
            f"{first.source}: prompt of {n} tokens is longer than data.max_prompt_tokens={max_tokens} "
            f"({len(long)} of {len(examples)} prompts are; data.long_prompts=skip skips them)"
        )
    log.warning(
        "%s: %d of %d prompts longer than data.max_prompt_tokens=%d skipped (first: %s, %d tokens)",
        report.path, len(long), len(examples), max_tokens, first.source, n,
    )  # fmt: skip
    report.skipped["prompt_too_long"] += len(long)
    report.loaded -= len(long)
    if report.loaded == 0:
        raise UserError(f"{report.path}: no usable rows ({report.summary()})")
    dropped = {id(ex) for ex, _ in long}
    return [ex for ex in examples if id(ex) not in dropped]


def _case_list_tests(tests: Any) -> Any:
    """LiveCodeBench's test list ([{input, output, testtype}], often as a JSON string) as the TACO
    object parse_tests reads; anything else is returned as it came. Its functional (call-based) tests
    name no function in the row, so a row with them is skipped."""
    if isinstance(tests, str) and tests.lstrip().startswith("["):
        try:
            tests = json.loads(tests)
        except json.JSONDecodeError as err:
            raise SkipRow("broken_tests", f"not valid JSON: {err}") from err
    if not isinstance(tests, list):
        return tests
    if not all(isinstance(c, dict) and "input" in c and "output" in c for c in tests):
        raise SkipRow("broken_tests", "a test case is not an object with 'input' and 'output'")
    if any(c.get("testtype", "stdin") != "stdin" for c in tests):
        raise SkipRow("functional_tests", "call-based (functional) test cases are not supported")
    return {"inputs": [c["input"] for c in tests], "outputs": [c["output"] for c in tests]}


def _finish(report: LoadReport) -> None:
    if report.skipped:
        log.warning(report.summary())
    else:
        log.info(report.summary())
    if report.loaded == 0:
        raise UserError(f"{report.path}: no usable rows ({report.summary()})")
