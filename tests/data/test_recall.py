import pytest

from sparrow_megatron.data.recall import (
    EVAL,
    NEEDLE_CLASSES,
    TRAIN,
    RecallTask,
    RecallTaskConfig,
    recall_reward,
)
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
    cfg = RecallTaskConfig(num_queries=2)
    ex = RecallTask(cfg).example(EVAL, 0)
    haystack, query = ex.question.split("\n")
    assert len(haystack) == cfg.haystack_len
    assert query == "?" + "".join(ex.queries) and len(set(ex.queries)) == 2
    order = [m for m, _ in NEEDLE_CLASSES]
    assert sorted(ex.queries, key=order.index) == list(ex.queries)  # asked in class order
    # Exactly one needle per class, at its recorded position; everything else is filler.
    for (marker, alphabet), (needle_marker, char, pos) in zip(NEEDLE_CLASSES, ex.needles, strict=True):
        assert marker == needle_marker and char in alphabet and haystack[pos] == char
        assert sum(c in alphabet for c in haystack) == 1
    assert sum(c in cfg.filler_alphabet for c in haystack) == cfg.haystack_len - len(NEEDLE_CLASSES)
    values = {m: c for m, c, _ in ex.needles}
    assert ex.answer == "".join(m + values[m] for m in ex.queries)


def test_prompt_is_long_enough_to_exceed_small_kv_budgets(tmp_path):
    tokenizer = build_char_tokenizer(tmp_path)
    ex = RecallTask().example(EVAL, 0)
    text = ex.prompt_text(tokenizer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(tokenizer(ex.question, add_special_tokens=False)["input_ids"]) == len(ex.question)
    assert len(ids) > 1000  # > 60 pages of 16: sink 1 + local 2 + a few top-k pages cannot hold it all
    assert text.endswith("<|im_start|>assistant\n")
    assert [p for p, _ in RecallTask().prompts(tokenizer, EVAL, 2)][0] == text


def test_reward_is_exact_per_query():
    ex = RecallTask(RecallTaskConfig(num_queries=2)).example(EVAL, 1)
    (m1, m2), (v1, v2) = ex.queries, ex.values
    assert recall_reward(f"{m1}{v1}{m2}{v2}<|im_end|>", ex).reward == 1.0
    assert recall_reward(f"{m1} {v1} {m2} {v2}", ex).reward == 1.0  # whitespace is ignored
    wrong = "." if v2 != "." else ","
    score = recall_reward(f"{m1}{v1}{m2}{wrong}", ex)
    assert (score.reward, score.correct, score.total) == (0.5, 1, 2)
    assert recall_reward(f"{m2}{v2}{m1}{v1}", ex).reward == 0.0  # order matters
    assert recall_reward("", ex).reward == 0.0


def test_invalid_configs_are_rejected():
    with pytest.raises(ValueError, match="num_queries"):
        RecallTaskConfig(num_queries=4)
    with pytest.raises(ValueError, match="cannot hold"):
        RecallTaskConfig(haystack_len=2)
    with pytest.raises(ValueError, match="disjoint"):
        RecallTaskConfig(filler_alphabet="ab")
    with pytest.raises(ValueError, match="split"):
        RecallTask().example("test", 0)


def test_a_haystack_range_draws_each_examples_length_reproducibly():
    cfg = RecallTaskConfig(haystack_len=1536, min_haystack_len=512)
    task = RecallTask(cfg)
    lengths = [len(task.example(TRAIN, i).haystack) for i in range(64)]
    assert all(512 <= n <= 1536 for n in lengths) and len(set(lengths)) > 30
    assert lengths == [len(RecallTask(cfg).example(TRAIN, i).haystack) for i in range(64)]
    # An example of length n is the fixed-length task's example at n: only the length is drawn.
    ex = task.example(TRAIN, 3)
    fixed = RecallTask(RecallTaskConfig(haystack_len=len(ex.haystack))).example(TRAIN, 3)
    assert ex == fixed
    with pytest.raises(ValueError, match="min_haystack_len 600 > haystack_len 500"):
        RecallTaskConfig(haystack_len=500, min_haystack_len=600)


def test_the_embedded_default_spans_at_least_four_monitor_bins(tmp_path):
    from sparrow_megatron.loop.default import tiny_cpu
    from sparrow_megatron.loop.tasks import make_task

    cfg = tiny_cpu()
    tokenizer = build_char_tokenizer(tmp_path)
    prompts = make_task(cfg, tokenizer).prompts("train", 0, cfg.data.train_size)
    bins = set()
    for p in prompts:
        n = len(tokenizer(p.text, add_special_tokens=False)["input_ids"])
        # Decode positions n .. n + max_response_tokens - 1.
        bins |= {pos // cfg.monitor.bin_width for pos in (n, n + cfg.data.max_response_tokens - 1)}
    assert len(bins) >= 4, sorted(bins)
