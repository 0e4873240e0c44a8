"""`sparrow calibrate`: measure p5 acceptance per (candidate budget, position bin) on one SGLang
engine, then solve the schedule (the science is sparrow_megatron.sparsity.calibrate's).

One engine serves every budget (the schedule travels with each request), and sample j of prompt i
draws with the same seed under every budget (common random numbers), so rows of the table differ by
the budget, not by the luck of the draw.

Outputs in the run directory: `tails.json` (the solver's TailTable format: `sparrow schedule solve
tails.json --tau X` re-solves at another tau without measuring again), `measurements.json` (every
cell's count, mean, p5 and its bounds, before any gap filling), `topk/budget-B.jsonl` (the dense and
sparse top-K lists per sequence, the format of `sparrow tail`), `heatmap.png` (budget x bin -> p5),
`schedule.json` and `summary.json` (schedule, predicted speedup, timings).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch

from sparrow_megatron.errors import UserError, where
from sparrow_megatron.loop.config import TailSignal
from sparrow_megatron.sparsity.calibrate import (
    CellStats,
    Measurement,
    build_table,
    check_budgets,
    default_budgets,
    fill_unmeasured,
    measure_sequences,
    solve_calibrated,
)
from sparrow_megatron.sparsity.schedule import DEFAULT_BIN_WIDTH, DEFAULT_DENSE_LAYERS, Schedule
from sparrow_megatron.sparsity.selection import PageGeometry
from sparrow_megatron.sparsity.solver import TailTable

log = logging.getLogger(__name__)

# The embedded default (tiny recall model, ~0.54K-1.56K-token prompts, a few answer tokens): sized for 2 CPU
# cores. 16 prompts: spread over 5 position bins, each bin still gets ~3 prompts x 2 samples x 8 tokens,
# above min_bin_tokens (20).
TINY_DEFAULTS = {"num_prompts": 16, "samples": 2, "max_new_tokens": 8, "bin_width": 256}
MODEL_DEFAULTS = {"num_prompts": 64, "samples": 4, "max_new_tokens": 4096, "bin_width": DEFAULT_BIN_WIDTH}
# A vocabulary this small fits in the top-K lists whole: the acceptance is then exact, not bracketed.
EXACT_VOCAB_MAX = 256
DEFAULT_TOP_K = 20


@dataclass
class CalibrateConfig:
    """`sparrow calibrate`: what to measure, on which model and prompts, and where to write it."""

    model: str | None = None  # HF checkpoint dir; None: the embedded tiny recall model and its eval prompts
    prompts: str | None = None  # jsonl/json/parquet of math/code rows or {"prompt": ...} rows
    tau: float = 0.86
    signal: TailSignal = "lower"  # p5 of the lower bound: the reference's metric, with which tau was set
    budgets: tuple[int, ...] = ()  # candidates in tokens; () = multiples of 256 below the longest context
    max_candidates: int = 8  # cap of the default grid (thinned evenly beyond it)
    bin_width: int | None = None  # None: 256 for the embedded default, 2000 otherwise
    num_prompts: int | None = None  # None: 4 for the embedded default, 64 otherwise
    samples: int | None = None  # per prompt and budget; None: 2 / 4
    max_new_tokens: int | None = None  # None: 8 / 4096
    temperature: float = 1.0
    top_k: int | None = None  # None: the whole vocabulary if it has <= 256 tokens (exact), else 20
    min_bin_tokens: int = 20  # fewer tokens in a cell: its p5 counts as not measured
    dense_fallback: bool = False  # bins no candidate holds become dense instead of an error
    seed: int = 0
    geometry: PageGeometry = PageGeometry()
    dense_layers: tuple[int, ...] = DEFAULT_DENSE_LAYERS
    name: str = "calibrated"
    out: str = "calibration"
    urls: list[str] = field(default_factory=list)  # attach to running engines instead of launching one
    kv_pool_tokens: int | None = None  # None: enough for every prompt and response at once
    startup_timeout_s: float = 600.0
    request_timeout_s: float = 600.0
    # Predicted speedup: model shape (name or config.json; None: the model dir's), hardware, lengths.
    cost_model: str | None = None
    hardware: str = "h200"
    gen_len: int | None = None  # None: max_new_tokens

    @property
    def embedded(self) -> bool:
        return self.model is None

    def resolved(self) -> CalibrateConfig:
        """A copy with the mode-dependent defaults filled in, validated."""
        defaults = TINY_DEFAULTS if self.embedded else MODEL_DEFAULTS
        cfg = replace(self, budgets=tuple(self.budgets), urls=list(self.urls))
        for key, value in defaults.items():
            if getattr(cfg, key) is None:
                setattr(cfg, key, value)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if not 0.0 < self.tau < 1.0:
            raise UserError(f"field 'tau' must be in (0, 1), got {self.tau}")
        if self.signal not in get_args(TailSignal):
            raise UserError(
                f"field 'signal' must be one of {list(get_args(TailSignal))}, got {self.signal!r}"
            )
        positive = ("num_prompts", "samples", "max_new_tokens", "bin_width", "max_candidates")
        for key in positive:
            value = getattr(self, key)
            if value is not None and value < 1:
                raise UserError(f"field '{key}' must be >= 1, got {value}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"field 'top_k' must be >= 1, got {self.top_k}")
        if self.min_bin_tokens < 1:
            raise UserError(f"field 'min_bin_tokens' must be >= 1, got {self.min_bin_tokens}")
        if self.temperature <= 0:
            raise UserError(f"field 'temperature' must be > 0 (sampling), got {self.temperature}")
        check_budgets(self.budgets, self.geometry)
        if self.model is not None and not (Path(self.model) / "config.json").is_file():
            raise UserError(
                f"field 'model': {self.model} is not a Hugging Face checkpoint dir (no config.json)"
            )
        if self.prompts is not None and not Path(self.prompts).is_file():
            raise UserError(f"field 'prompts': {self.prompts}: file not found")


def load_prompt_texts(path: str | Path, tokenizer: Any, limit: int) -> list[str]:
    """Chat-formatted prompts from a file of math rows (problem + answer: the training instruction is
    appended), code rows or plain {"prompt": ...} rows; malformed rows are skipped and logged."""
    from sparrow_megatron.data.datasets import ANSWER_KEYS, MATH_INSTRUCTION, PROBLEM_KEYS, read_rows

    path = Path(path)
    texts: list[str] = []
    skipped: dict[str, int] = {}
    rows = 0
    for number, row in read_rows(path):
        rows += 1
        reason = None
        if not isinstance(row, dict):
            reason = "not_an_object"
        else:
            problem = next((row[k] for k in PROBLEM_KEYS if row.get(k) is not None), None)
            if isinstance(problem, list):  # chat messages (DAPO): the last user turn
                users = [m.get("content") for m in problem if isinstance(m, dict) and m.get("role") == "user"]
                problem = users[-1] if users else None
            if not isinstance(problem, str) or not problem.strip():
                reason = "missing_or_empty_prompt"
        if reason is not None:
            skipped[reason] = skipped.get(reason, 0) + 1
            log.warning("%s: skipped row (%s)", where(path, number), reason)
            continue
        is_math = any(row.get(k) is not None for k in ANSWER_KEYS) and "input_output" not in row
        content = f"{problem}\n\n{MATH_INSTRUCTION}" if is_math else problem
        messages = [{"role": "user", "content": content}]
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        if len(texts) >= limit:
            break
    if not texts:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())) or "the file has no rows"
        raise UserError(f"{path}: no usable prompt rows ({rows} rows read; {reasons})")
    return texts


def recall_prompt_texts(tokenizer: Any, count: int, seed: int = 0, haystack: tuple[int, int] | None = None):
    """The embedded task's eval prompts (what the tiny default's rollouts look like). haystack: its
    [min, max] length; default the embedded default's, so the schedule covers every bin they reach."""
    from sparrow_megatron.data.recall import EMBEDDED_HAYSTACK, RecallTask, RecallTaskConfig

    lo, hi = haystack or EMBEDDED_HAYSTACK
    task = RecallTask(RecallTaskConfig(haystack_len=hi, min_haystack_len=lo if lo < hi else 0, seed=seed))
    return [text for text, _ in task.prompts(tokenizer, "eval", count)]


# --- the run --------------------------------------------------------------------------------------


@dataclass
class CalibrationResult:
    out_dir: Path
    table: TailTable  # as measured (None = not measured)
    solved_table: TailTable  # gaps filled: what the schedule was solved from (tails.json)
    cells: list[CellStats]
    schedule: Schedule | None  # None when no schedule could hold tau (see error)
    prediction: Any  # cost.SpeedupPrediction | None
    measurements: list[Measurement]
    files: dict[str, Path]
    timings: dict[str, float]
    error: str | None = None
    prompt_lens: list[int] = field(default_factory=list)


def _model_dir(cfg: CalibrateConfig) -> Path:
    if cfg.model is not None:
        return Path(cfg.model)
    from sparrow_megatron.data.recall import TINY_RECALL_DIR

    return TINY_RECALL_DIR


def run_calibration(
    config: CalibrateConfig,
    progress: Callable[[str, int, int], None] | None = None,
) -> CalibrationResult:
    """Measure every candidate budget on one engine, write the files, solve the schedule.

    `progress(stage, done, total)` is called as requests finish (the CLI draws it with rich).
    A failed solve (no candidate holds tau in some bin) still writes the measurements, the table and the
    heatmap, and returns with `error` set.
    """
    from sparrow_megatron.data.datasets import load_tokenizer
    from sparrow_megatron.models.config import read_hf_config
    from sparrow_megatron.rollout import (
        FleetOptions,
        RolloutConfig,
        RolloutFleet,
        SamplingParams,
        topk_tensors,
    )
    from sparrow_megatron.sparsity.topk_file import TopKSequence

    cfg = config.resolved()
    t_start = time.perf_counter()
    model_dir = _model_dir(cfg)
    model_config = read_hf_config(model_dir)
    tokenizer = load_tokenizer(model_dir)
    if cfg.prompts is not None:
        texts = load_prompt_texts(cfg.prompts, tokenizer, cfg.num_prompts)
    else:
        texts = recall_prompt_texts(tokenizer, cfg.num_prompts, cfg.seed)
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    max_positions = model_config.get("max_position_embeddings")
    if max_positions:
        keep = [p for p in prompts if len(p) + cfg.max_new_tokens <= max_positions]
        if len(keep) < len(prompts):
            log.warning(
                "skipped %d prompts longer than %d - max_new_tokens %d (the model's context)",
                len(prompts) - len(keep), max_positions, cfg.max_new_tokens,
            )  # fmt: skip
        if not keep:
            raise UserError(
                f"every prompt + max_new_tokens ({cfg.max_new_tokens}) exceeds the model's "
                f"max_position_embeddings ({max_positions})"
            )
        prompts = keep
    max_context = max(len(p) for p in prompts) + cfg.max_new_tokens
    budgets = tuple(sorted(cfg.budgets)) or default_budgets(max_context, cfg.max_candidates)
    dense_everywhere = [b for b in budgets if b >= max_context]
    if dense_everywhere:
        log.warning("budgets %s are >= the longest context (%d): dense at every step", dense_everywhere,
                    max_context)  # fmt: skip
    vocab = int(model_config.get("vocab_size") or 0)
    top_k = cfg.top_k or (vocab if 0 < vocab <= EXACT_VOCAB_MAX else DEFAULT_TOP_K)

    out = Path(cfg.out)
    (out / "topk").mkdir(parents=True, exist_ok=True)
    pool = cfg.kv_pool_tokens or max(
        4096, sum(len(p) for p in prompts) + len(prompts) * cfg.samples * cfg.max_new_tokens * 2
    )
    rollout = RolloutConfig(
        engines=1,
        urls=list(cfg.urls),
        top_k_logprobs=top_k,
        kv_pool_tokens=pool,
        timeout_s=cfg.request_timeout_s,
    )
    options = FleetOptions(
        model_path=str(model_dir), page_size=cfg.geometry.page_size, seed=cfg.seed, run_dir=str(out / "engines"),
        startup_timeout_s=cfg.startup_timeout_s, health_interval_s=10.0,
    )  # fmt: skip
    sampling = SamplingParams(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    requests = len(prompts) * cfg.samples
    report = progress or (lambda stage, done, total: None)
    measurements: list[Measurement] = []
    timings: dict[str, float] = {}
    dense_cache: dict[tuple[int, tuple[int, ...]], tuple[torch.Tensor, torch.Tensor]] = {}
    files: dict[str, Path] = {}

    t0 = time.perf_counter()
    with RolloutFleet(rollout, options) as fleet:
        timings["engine_start_s"] = time.perf_counter() - t0
        for k, budget in enumerate(budgets):
            report(f"budget {budget}: generating", k * requests, len(budgets) * requests)
            schedule = Schedule.fixed(budget, geometry=cfg.geometry, dense_layers=cfg.dense_layers)
            t_gen = time.perf_counter()
            batch = fleet.generate(prompts, sampling, n=cfg.samples, schedule=schedule, top_logprobs=top_k)
            gen_s = time.perf_counter() - t_gen
            t_score = time.perf_counter()
            samples = [s for s in batch.flat() if s.response_len > 0]
            # Equal seeds often give equal tokens under near budgets: score each distinct response once.
            todo = {(s.prompt_index, tuple(s.output_ids)): s for s in samples}
            todo = {key: s for key, s in todo.items() if key not in dense_cache}
            done = requests - len(todo)
            report(f"budget {budget}: scoring densely", k * requests + done, len(budgets) * requests)

            def score(item):
                key, s = item
                return key, topk_tensors(fleet.score(s.prompt_ids, s.output_ids, top_logprobs=top_k), top_k)

            with ThreadPoolExecutor(max_workers=max(1, min(8, len(todo)))) as pool:
                for key, p in pool.map(score, todo.items()):
                    dense_cache[key] = p
                    done += 1
                    report(f"budget {budget}: scoring densely", k * requests + done, len(budgets) * requests)
            lens, dense, sparse = [], [], []
            path = out / "topk" / f"budget-{budget}.jsonl"
            with path.open("w") as fh:
                for s in samples:
                    p, q = dense_cache[(s.prompt_index, tuple(s.output_ids))], topk_tensors(s, top_k)
                    lens.append(len(s.prompt_ids))
                    dense.append(p)
                    sparse.append(q)
                    fh.write(TopKSequence(len(s.prompt_ids), p[0], p[1], q[0], q[1]).to_json() + "\n")
            m = measure_sequences(budget, lens, dense, sparse)
            m.generate_s, m.score_s = gen_s, time.perf_counter() - t_score
            measurements.append(m)
            files[f"topk_{budget}"] = path
            report(f"budget {budget}: done", (k + 1) * requests, len(budgets) * requests)
    timings["measure_s"] = time.perf_counter() - t0

    provenance = {
        "source": "sparrow calibrate",
        "model": str(cfg.model or "tiny-recall (embedded)"),
        "prompts": str(cfg.prompts or "recall eval split"),
        "num_prompts": len(prompts),
        "samples": cfg.samples,
        "max_new_tokens": cfg.max_new_tokens,
        "temperature": cfg.temperature,
        "top_k": top_k,
        "signal": cfg.signal,
        "exact_acceptance": top_k >= vocab > 0,
        "min_bin_tokens": cfg.min_bin_tokens,
        "seed": cfg.seed,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    table, cells = build_table(measurements, cfg.bin_width, cfg.geometry, cfg.min_bin_tokens, cfg.tau,
                               provenance, signal=cfg.signal)  # fmt: skip
    solved_table, filled = fill_unmeasured(table)
    files["tails"] = solved_table.save(out / "tails.json")
    files["measurements"] = _write_json(out / "measurements.json", {
        "tau": cfg.tau, "bin_width": cfg.bin_width, "budgets": list(budgets),
        "cells": [asdict(c) for c in cells],
        "per_budget": [{"budget": m.budget, "sequences": m.sequences, "tokens": int(m.alpha.size),
                        "nan_tokens": m.nan_tokens, "mean": _nanmean(m.alpha), "generate_s": m.generate_s,
                        "score_s": m.score_s} for m in measurements],
        "provenance": provenance,
    })  # fmt: skip
    files["heatmap"] = plot_calibration_heatmap(table, out / "heatmap.png", cfg.tau)

    schedule, prediction, error = None, None, None
    try:
        schedule = solve_calibrated(solved_table, cfg.tau, cfg.dense_fallback, cfg.name, cfg.dense_layers)
    except UserError as err:
        error = str(err)
        if filled:
            error += "; unmeasured cells took the p5 of the next measured bin (see filled_cells)"
        error += f"; re-solve with `sparrow schedule solve {files['tails']}`"
    prompt_lens = [len(p) for p in prompts]
    if schedule is not None:
        files["schedule"] = schedule.save(out / "schedule.json")
        prediction = _predict(cfg, model_dir, schedule, prompt_lens)
    timings["total_s"] = time.perf_counter() - t_start
    files["summary"] = _write_json(out / "summary.json", {
        "schedule": None if schedule is None else schedule.to_dict(),
        "error": error,
        "prediction": None if prediction is None else prediction.to_dict(),
        "filled_cells": [list(f) for f in filled],
        "timings": timings,
    })  # fmt: skip
    return CalibrationResult(out, table, solved_table, cells, schedule, prediction, measurements, files,
                             timings, error, prompt_lens)  # fmt: skip


def _predict(cfg: CalibrateConfig, model_dir: Path, schedule: Schedule, prompt_lens: list[int]):
    from sparrow_megatron.sparsity.cost import ModelShape, predict_speedup, resolve_hardware, resolve_model

    shape = resolve_model(cfg.cost_model) if cfg.cost_model else ModelShape.from_hf_config(model_dir)
    prompt_len = round(sum(prompt_lens) / len(prompt_lens))
    return predict_speedup(shape, resolve_hardware(cfg.hardware), schedule, prompt_len,
                           cfg.gen_len or cfg.max_new_tokens)  # fmt: skip


def plot_calibration_heatmap(table: TailTable, path: str | Path, tau: float) -> Path:
    """Budget x bin -> p5, restricted to the bins that were measured for some budget."""
    from sparrow_megatron.plots import plot_heatmap

    values = np.array([[math.nan if v is None else v for v in row] for row in table.p5], dtype=float)
    cols = [j for j in range(table.num_bins) if np.isfinite(values[:, j]).any()]
    labels = [f"{j * table.bin_width}-{(j + 1) * table.bin_width}" for j in cols]
    return plot_heatmap(path, values[:, cols], list(table.budgets), labels,
                        title="p5 acceptance",
                        xlabel="position bin (prompt + generated)", ylabel="KV budget (tokens)",
                        tau=tau)  # fmt: skip


def _nanmean(x: np.ndarray) -> float | None:
    return None if x.size == 0 or np.isnan(x).all() else float(np.nanmean(x))


def _write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
