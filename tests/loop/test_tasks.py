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
