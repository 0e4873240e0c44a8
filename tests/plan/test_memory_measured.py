"""The plan's activation and logits terms against measurement: MemTracker under FakeTensorMode at each GPU
recipe's real shapes (40,960-token micro-batch, its TP, SP on and off, recompute none and full), and
MemTracker on real tensors for a small model under TP=2 on gloo (torchrun). The plan is evaluated for the
layer spec these runs build (Megatron's local spec, layer_spec="local"); each check is within 15%."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from sparrow_megatron.config import load_recipe
from sparrow_megatron.plan import memory
from sparrow_megatron.plan.planner import model_shape, trainer_shape
from sparrow_megatron.plan.shapes import TrainerShape
from sparrow_megatron.sparsity.cost import ModelShape

REPO = Path(__file__).resolve().parents[2]
GPU_RECIPES = ["qwen3_1p7b_math", "qwen3_1p7b_code", "qwen3_4b_math", "qwen3_8b_math", "qwen3_14b_math"]
TOLERANCE = 0.15
CHUNK = 4096
SMALL = ModelShape("small", 2, 256, 4, 2, 64, 768, 1024, True)


def _recipe_shapes() -> list[TrainerShape]:
    """Each distinct (model, TP, micro-batch) of the GPU recipes, with SP on and (TP > 1) off."""
    shapes = {}
    for name in GPU_RECIPES:
        cfg = load_recipe(REPO / "recipes" / f"{name}.py")
        base = trainer_shape(cfg, model_shape(cfg), layer_spec="local")
        for sp in {base.tp > 1, False}:
            shape = replace(base, sequence_parallel=sp, recompute="none", pp=1, cp=1)
            shapes[(shape.model.name, shape.tp, sp, shape.micro_batch_tokens)] = shape
    return list(shapes.values())


def _model_key(shape: TrainerShape):
    return shape.model.name.lower() if shape.model is not SMALL else SMALL.__dict__


def _cases(shape: TrainerShape, tokens: int) -> list[dict]:
    common = {"model": _model_key(shape), "tp": shape.tp, "sp": shape.sequence_parallel, "tokens": tokens}
    cases = [
        {**common, "kind": "layers", "recompute": "none", "layers": 1},
        {**common, "kind": "layers", "recompute": "none", "layers": 2},
        {**common, "kind": "layers", "recompute": "full", "layers": 2},
        {**common, "kind": "output_layer"},
    ]
    if not shape.sequence_parallel:
        cases.append({**common, "kind": "chunk", "tokens": CHUNK})
    return cases


def _run(cases: list[dict], tmp: Path, tp: int = 1, real: bool = False) -> list[dict]:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "cases.json").write_text(json.dumps(cases))
    args = ["-m", "tests.plan.memtrack", str(tmp / "cases.json"), str(tmp / "out.json")]
    if real:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(tp), "--standalone"]
        cmd += [*args, "--real"]
    else:
        cmd = [sys.executable, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), *sys.path]))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((tmp / "out.json").read_text())


def _planned(shape: TrainerShape, case: dict) -> dict[str, float]:
    """The plan's bytes for what a case measures (the plan's terms, summed as the run holds them)."""
    s = case["tokens"]
    shape = replace(
        shape, micro_batch_tokens=s, recompute=case.get("recompute", "none"), recompute_num_layers=1
    )
    buffers = 4.0 * s * shape.model.head_dim + (2.0 * s * shape.model.hidden_size if shape.sp > 1 else 0.0)
    output = memory.checkpoint_bytes(shape)  # the block's output hidden state / the output layer's input
    if case["kind"] == "layers":
        n = case["layers"]
        held = memory.retained_per_micro_batch(shape, layers=n)
        return {
            "layer": memory.layer_activation_bytes(shape),
            "retained": held + buffers + output,
            "peak": held
            + memory.recompute_working_bytes(shape, layers=n)
            + memory.backward_transient_bytes(shape)
            + buffers
            + output,
        }
    if case["kind"] == "output_layer":
        logits = memory.logits_bytes(shape)
        return {
            "retained": logits["logits"] + output + buffers,
            "peak": logits["logits"] + logits["logits_grad"] + 2 * output + buffers,
        }
    chunk = replace(shape, logprob_chunk_tokens=s)
    return {"peak": memory.logits_bytes(chunk)["logprob_chunk"]}


def _check(shape: TrainerShape, results: list[dict]) -> list[str]:
    misses = []
    layer_runs = {}
    for case in results:
        want = _planned(shape, case)
        label = f"{shape.model.name} TP{shape.tp} SP{int(shape.sequence_parallel)} {case['kind']}"
        if case["kind"] == "layers":
            label += f" {case['recompute']} x{case['layers']}"
            layer_runs[(case["recompute"], case["layers"])] = case
        for key in ("retained", "peak"):
            if key in case and key in want:
                ratio = want[key] / case[key]
                if abs(ratio - 1) > TOLERANCE:
                    misses.append(
                        f"{label} {key}: plan {want[key] / 2**30:.3f} GiB, measured "
                        f"{case[key] / 2**30:.3f} GiB (ratio {ratio:.3f})"
                    )
    one, two = layer_runs[("none", 1)], layer_runs[("none", 2)]
    measured_layer = two["retained"] - one["retained"]
    planned_layer = _planned(shape, one)["layer"]
    if abs(planned_layer / measured_layer - 1) > TOLERANCE:
        misses.append(
            f"{shape.model.name} TP{shape.tp} SP{int(shape.sequence_parallel)} per layer: plan "
            f"{planned_layer / 2**30:.3f} GiB, measured {measured_layer / 2**30:.3f} GiB"
        )
    return misses


def test_plan_matches_memtracker_at_every_gpu_recipes_shapes(tmp_path):
    shapes = _recipe_shapes()
    assert {s.model.name for s in shapes} == {"Qwen3-1.7B", "Qwen3-4B", "Qwen3-8B", "Qwen3-14B"}
    assert all(s.micro_batch_tokens >= 37_000 for s in shapes)
    cases = [c for s in shapes for c in _cases(s, s.micro_batch_tokens)]
    results = _run(cases, tmp_path)
    misses = []
    for shape in shapes:
        key = (_model_key(shape), shape.tp, shape.sequence_parallel)
        mine = [r for r in results if (r["model"], r["tp"], r["sp"]) == key]
        misses += _check(shape, mine)
    assert not misses, "\n".join(misses)


def test_plan_matches_real_tensors_under_tp2_on_gloo(tmp_path):
    shapes = [TrainerShape(SMALL, tp=2, sequence_parallel=sp, layer_spec="local") for sp in (True, False)]
    cases = [c for s in shapes for c in _cases(s, 512) if c["kind"] == "layers"]
    results = _run(cases, tmp_path, tp=2, real=True)  # one torchrun for both
    assert len(results) == 6
    misses = []
    for shape in shapes:
        misses += _check(shape, [r for r in results if r["sp"] == shape.sequence_parallel])
    assert not misses, "\n".join(misses)


def test_recompute_and_sequence_parallel_shrink_the_planned_activations():
    """The terms move the way the measurements do: SP divides the hidden-state terms by TP, full
    recompute keeps one hidden state per layer, and the TE layer keeps less than the local one."""
    base = TrainerShape(ModelShape("m", 4, 1024, 8, 4, 128, 4096, 32000, True), tp=2, micro_batch_tokens=8192)
    sp = replace(base, sequence_parallel=True)
    full = replace(sp, recompute="full")
    assert memory.retained_per_micro_batch(sp) < memory.retained_per_micro_batch(base)
    assert memory.retained_per_micro_batch(full) == 4 * memory.checkpoint_bytes(sp)
    assert memory.layer_activation_bytes(replace(base, layer_spec="local")) > memory.layer_activation_bytes(
        base
    )
