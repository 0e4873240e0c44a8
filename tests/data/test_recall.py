import pytest

from sparrow_megatron.data.recall import EVAL, TRAIN, RecallTask, RecallTaskConfig, recall_reward
from sparrow_megatron.models.tiny import build_char_tokenizer


def test_examples_are_seeded_and_splits_differ():
    task = RecallTask()
    assert task.example(TRAIN, 5) == RecallTask().example(TRAIN, 5)
    assert task.example(TRAIN, 5) != task.example(EVAL, 5)
    assert task.example(TRAIN, 5) != RecallTask(RecallTaskConfig(seed=1)).example(TRAIN, 5)
    train = {task.example(TRAIN, i).question for i in range(50)}
    evals = {task.example(EVAL, i).question for i in range(50)}
    assert train.isdisjoint(evals)
    assert [e.index for e in task.examples(EVAL, 3, start=10)] == [10, 11, 12]


def test_prompt_structure_and_answer():
    cfg = RecallTaskConfig()
    ex = RecallTask(cfg).example(EVAL, 0)
    keys = [k for k, _ in ex.pairs]
    assert len(set(keys)) == cfg.num_pairs
    assert len(ex.queries) == cfg.num_queries and set(ex.queries) <= set(keys)
    listing, query = ex.question.split("\n")
    assert len(listing) == cfg.num_pairs * (2 + cfg.gap)
    assert query == "?" + "".join(ex.queries)
    # Each value sits right after its key, exactly once in the prompt.
    for k, v in ex.pairs:
        assert listing.count(k) == 1 and listing[listing.index(k) + 1] == v
    assert ex.answer == "".join(k + dict(ex.pairs)[k] for k in ex.queries)


def test_prompt_is_long_enough_to_exceed_small_kv_budgets(tmp_path):
    tokenizer = build_char_tokenizer(tmp_path)
    ex = RecallTask().example(EVAL, 0)
    ids = tokenizer(ex.prompt_text(tokenizer), add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == ex.prompt_text(tokenizer)
    assert len(tokenizer(ex.question, add_special_tokens=False)["input_ids"]) == len(ex.question)
    assert len(ids) > 1000  # > 60 pages of 16: a budget of sink 1 + local 2 + top-k cannot hold it all
    assert ex.prompt_text(tokenizer).endswith("<|im_start|>assistant\n")


def test_reward_is_exact_per_query():
    ex = RecallTask(RecallTaskConfig(num_queries=2)).example(EVAL, 1)
    (k1, k2), (v1, v2) = ex.queries, ex.values
    assert recall_reward(f"{k1}{v1}{k2}{v2}<|im_end|>", ex).reward == 1.0
    assert recall_reward(f"{k1} {v1} {k2} {v2}", ex).reward == 1.0  # whitespace is ignored
    wrong = "A" if v2 != "A" else "B"
    score = recall_reward(f"{k1}{v1}{k2}{wrong}", ex)
    assert (score.reward, score.correct, score.total) == (0.5, 1, 2)
    assert recall_reward(f"{k2}{v2}{k1}{v1}", ex).reward == 0.0  # order matters
    assert recall_reward("", ex).reward == 0.0
    assert recall_reward(f"{k1}{v1.lower()}", ex).correct == 0


def test_invalid_configs_are_rejected():
    with pytest.raises(ValueError, match="num_queries"):
        RecallTaskConfig(num_pairs=2, num_queries=3)
    with pytest.raises(ValueError, match="distinct keys"):
        RecallTaskConfig(num_pairs=100)
    with pytest.raises(ValueError, match="disjoint"):
        RecallTaskConfig(filler_alphabet="ab")
    with pytest.raises(ValueError, match="split"):
        RecallTask().example("test", 0)
