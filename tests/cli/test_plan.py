"""`sparrow plan` on the recipes (table and JSON, exit code 1 when a role does not fit) and `sparrow
submit`'s refusal of a job that does not fit, with the plan's numbers (`--force` submits anyway)."""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "recipes" / "qwen3_14b_math.py")
# 14B without model parallelism: bf16 weights + fp32 grads alone are 83 GiB per GPU.
NO_MODEL_PARALLEL = ["trainer.tp=1", "trainer.pp=1"]


def _doc_keys() -> set[str]:
    text = (REPO / "docs" / "memory_plan.md").read_text()
    return set(re.findall(r"`([a-z_]+)`", text))


def test_plan_json_has_every_documented_key(sparrow):
    code, out, _ = sparrow("plan", RECIPE, "--hardware", "h200", "--json")
    plan = json.loads(out)
    assert plan["hardware"] == "h200" and plan["model"] == "Qwen3-14B" and plan["layer_spec"] == "te"
    assert code == (0 if plan["fits"] else 1)
    trainer, engine = plan["roles"]
    assert trainer["role"] == "trainer" and engine["role"] == "engine"
    assert set(trainer["terms_gib"]) >= {"weights", "gradients", "optimizer", "activations", "runtime"}
    assert set(engine["terms_gib"]) == {"weights", "kv_pool", "landmarks", "runtime_reserve"}
    assert abs(sum(trainer["terms_gib"].values()) - trainer["total_gib"]) < 1e-9
    keys = set(plan) | set(plan["settings"]) | set(plan["time_s"])
    for role in plan["roles"]:
        keys |= set(role) | set(role["terms_gib"])
    assert keys <= _doc_keys(), sorted(keys - _doc_keys())


def test_plan_table_and_exit_code_when_the_trainer_does_not_fit(sparrow):
    code, out, _ = sparrow("plan", RECIPE, *NO_MODEL_PARALLEL)
    assert code == 1
    text = " ".join(out.split())
    assert "trainer: does not fit" in text and "TP 1 x PP 1" in text
    assert "rollout sparse" in text and "step" in text


def test_plan_names_a_bad_override_and_an_unknown_model(sparrow):
    code, _, err = sparrow("plan", RECIPE, "trainer.tp=oops")
    assert code == 2 and "trainer.tp" in err
    code, _, err = sparrow("plan", RECIPE, "model.name=Llama-3-8B")
    assert code == 2 and "field 'model.name': 'Llama-3-8B' is not a known Qwen3 size" in err


def _submit_args(tmp_path: Path) -> list[str]:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps({"num_attention_heads": 40, "num_key_value_heads": 8, "num_hidden_layers": 40})
    )
    train = tmp_path / "train.jsonl"
    train.write_text('{"problem": "1+1", "answer": "2"}\n')
    return [
        f"model.hf_dir={model}",
        f"data.train_path={train}",
        f"cluster.job_dir={tmp_path / 'jobs'}",
        "cluster.account=acct",
    ]


def test_submit_refuses_a_job_that_does_not_fit_with_the_plans_numbers(sparrow, tmp_path):
    args = _submit_args(tmp_path)
    code, out, err = sparrow("submit", RECIPE, *args, *NO_MODEL_PARALLEL, "--dry-run")
    assert code == 2
    assert "'qwen3-14b-math' does not fit on h100" in err
    # The total against the device and the four largest terms.
    line = re.search(r"trainer: \d+\.\d GiB of 79\.6 GiB \(((?:\w+ \d+\.\d(?:, )?){4}) GiB\)", err)
    assert line and "gradients" in line.group(1), err
    assert "--force" in err
    assert not (tmp_path / "jobs").exists()  # nothing written, nothing submitted

    code, out, err = sparrow("submit", RECIPE, *args, *NO_MODEL_PARALLEL, "--dry-run", "--force")
    assert code == 0, err
    assert "warning (--force)" in out and "sbatch:" in out


def test_submit_checks_against_the_named_hardware(sparrow, tmp_path):
    # 14B unsplit on short sequences: ~93 GiB of weights, fp32 gradients and optimizer shards (DP 16)
    # per GPU whatever the activation settings: over an H100, within an H200.
    over = [
        *NO_MODEL_PARALLEL,
        "data.max_prompt_tokens=512",
        "data.max_response_tokens=512",
        "trainer.micro_batch_tokens=1024",
    ]
    args = _submit_args(tmp_path)
    code, _, err = sparrow("submit", RECIPE, *args, *over, "--dry-run")
    assert code == 2 and "does not fit on h100" in err
    code, out, err = sparrow("submit", RECIPE, *args, *over, "--dry-run", "--hardware", "h200")
    assert code == 0, err
    assert "sbatch:" in out
