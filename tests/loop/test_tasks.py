from sparrow_megatron.data.datasets import load_tokenizer
from sparrow_megatron.data.recall import TINY_RECALL_DIR
from sparrow_megatron.loop.tasks import RecallTaskAdapter


def test_synthetic_train_size_cycles_the_train_split_only():
    tokenizer = load_tokenizer(TINY_RECALL_DIR)
    cycled = RecallTaskAdapter(tokenizer, seed=0, train_size=2)
    prompts = cycled.prompts("train", 1, 4)
    assert [p.index for p in prompts] == [1, 2, 3, 4]  # group ids stay distinct
    assert [p.text for p in prompts] == [prompts[0].text, prompts[1].text] * 2
    assert prompts[0].text != prompts[1].text
    fresh = RecallTaskAdapter(tokenizer, seed=0)
    assert [p.text for p in fresh.prompts("train", 0, 2)] == [
        prompts[1].text,
        prompts[0].text,
    ]  # 1 % 2, 2 % 2
    assert len({p.text for p in cycled.prompts("eval", 0, 4)}) == 4


def _task_through_sparrow_train(tmp_path, recipe, rows, overrides=()):
    """What `sparrow train RECIPE key=value ...` builds before it trains: the config, then the task."""
    import json

    from sparrow_megatron.config import load_config
    from sparrow_megatron.loop.run import resolve_model_dir
    from sparrow_megatron.loop.tasks import make_task

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(
        f"recipes/{recipe}",
        [f"model.hf_dir={TINY_RECALL_DIR}", f"data.train_path={train}", "data.max_prompt_tokens=256",
         "data.max_response_tokens=64", "cluster.executor=local", *overrides],
    )  # fmt: skip
    return make_task(cfg, load_tokenizer(resolve_model_dir(cfg)))


def test_math_recipe_builds_its_task_with_renamed_columns(tmp_path):
    rows = [{"q": "What is 1 + 1?", "sol": "2"}, {"q": "What is 2 + 3?", "sol": "5"}]
    task = _task_through_sparrow_train(
        tmp_path, "qwen3_1p7b_math.py", rows, ["data.columns={q: prompt, sol: answer}", "data.shuffle=false"]
    )
    prompts = task.prompts("train", 0, 3)
    assert [p.example.answer for p in prompts] == ["2", "5", "2"]
    assert "What is 2 + 3?" in prompts[1].text
    assert task.reward(prompts[1], "so the answer is \\boxed{5}") == 1.0
    assert task.reward(prompts[1], "\\boxed{4}") == 0.0


def test_shuffled_train_epochs_are_seeded_permutations_of_the_file(tmp_path):
    rows = [{"problem": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(12)]
    task = _task_through_sparrow_train(tmp_path, "qwen3_1p7b_math.py", rows, ["loop.seed=3"])
    answers = [p.example.answer for p in task.prompts("train", 0, 36)]
    epochs = [answers[k * 12 : (k + 1) * 12] for k in range(3)]
    assert all(sorted(e) == sorted(r["answer"] for r in rows) for e in epochs)  # each row once per epoch
    assert epochs[0] != [r["answer"] for r in rows] and epochs[0] != epochs[1]
    # A pure function of the index (what --resume relies on), also when read from the middle.
    again = _task_through_sparrow_train(tmp_path, "qwen3_1p7b_math.py", rows, ["loop.seed=3"])
    assert [p.example.answer for p in again.prompts("train", 20, 10)] == answers[20:30]


def test_code_recipe_builds_its_task(tmp_path):
    tests = {"inputs": ["3\n"], "outputs": ["6\n"]}
    rows = [{"question": "Print twice the number read from stdin.", "input_output": tests}]
    task = _task_through_sparrow_train(tmp_path, "qwen3_1p7b_code.py", rows)
    (prompt,) = task.prompts("train", 0, 1)
    assert "twice the number" in prompt.text and prompt.example.tests.inputs == ["3\n"]


def test_code_task_judges_with_the_reward_section(tmp_path):
    """`reward.*` overrides reach the code task's judge: its isolation, its sandboxes, its scoring."""
    tests = {"inputs": ["3\n", "4\n"], "outputs": ["6\n", "9\n"]}  # the second case: 2 * 4 is not 9
    rows = [{"question": "Print twice the number read from stdin.", "input_output": tests}]
    response = "```python\nprint(2 * int(input()))\n```"
    base = ["reward.isolation=unsafe", "reward.timeout_s=7.5", "reward.memory_mb=300", "reward.workers=3"]
    task = _task_through_sparrow_train(tmp_path, "qwen3_1p7b_code.py", rows, base)
    (prompt,) = task.prompts("train", 0, 1)
    sandbox = task.code.sandbox
    assert (sandbox.isolation, sandbox.timeout_s, sandbox.memory_mb) == ("unsafe", 7.5, 300)
    assert task.pool.workers == 3
    assert task.reward(prompt, response) == 0.5  # the fraction of cases passed
    strict = _task_through_sparrow_train(
        tmp_path, "qwen3_1p7b_code.py", rows, [*base, "reward.all_or_nothing=true"]
    )
    assert strict.reward(prompt, response) == 0.0


def test_code_task_refuses_before_training_where_programs_cannot_be_isolated(tmp_path, monkeypatch):
    import pytest

    from sparrow_megatron.reward import sandbox
    from sparrow_megatron.reward.sandbox import IsolationUnavailable

    monkeypatch.setattr(sandbox, "_VERIFIED", set())  # forget an earlier successful probe
    monkeypatch.setattr(sandbox, "missing_features", lambda config: ["user namespaces: disabled here"])
    rows = [{"question": "Echo.", "input_output": {"inputs": ["1\n"], "outputs": ["1\n"]}}]
    with pytest.raises(IsolationUnavailable, match="user namespaces: disabled here"):
        _task_through_sparrow_train(tmp_path, "qwen3_1p7b_code.py", rows)
    # Set explicitly, unsafe runs (with its warning); nothing falls back to it on its own.
    assert _task_through_sparrow_train(tmp_path, "qwen3_1p7b_code.py", rows, ["reward.isolation=unsafe"])


def test_math_task_reads_every_named_eval_set(tmp_path):
    import json

    sets = {}
    for name, n in (("aime24", 2), ("math500", 3)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text(
            "".join(json.dumps({"problem": f"{name} {i}?", "answer": str(i)}) + "\n" for i in range(n))
        )
        sets[name] = str(path)
    legacy = tmp_path / "amc.jsonl"
    legacy.write_text(json.dumps({"problem": "amc?", "answer": "7"}) + "\n")
    rows = [{"problem": "What is 1 + 1?", "answer": "2"}]
    task = _task_through_sparrow_train(
        tmp_path, "qwen3_1p7b_math.py", rows, [f"data.eval={json.dumps(sets)}", f"data.eval_path={legacy}"]
    )
    assert task.eval_sets() == {"aime24": 2, "math500": 3, "amc": 1}
    assert [p.example.answer for p in task.prompts("math500", 0, 3)] == ["0", "1", "2"]
    assert "aime24 1?" in task.prompts("aime24", 1, 1)[0].text
    try:
        (prompt,) = task.prompts("amc", 0, 1)
        judged = [task.submit_reward(prompt, r).result() for r in ("\\boxed{7}", "\\boxed{8}", "no box")]
        assert [(j.reward, j.error) for j in judged] == [(1.0, ""), (0.0, ""), (0.0, "")]
    finally:
        task.close()
