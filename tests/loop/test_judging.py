"""Rewards at the speed of the fleet: judged while the batch still generates, failures scored 0 and
counted by reason, code responses judged side by side in the sandbox pool (counted, never timed)."""

import json
import threading
import time

from sparrow_megatron.config import JobConfig
from sparrow_megatron.loop.collect import collect
from sparrow_megatron.loop.tasks import Prompt
from sparrow_megatron.reward.judge_pool import ProcessJudgePool
from sparrow_megatron.reward.math_reward import math_reward_value
from sparrow_megatron.rollout.types import GenerationResult, Sample, SamplingParams
from tests.reward import judges


class _Tokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


class _MathTask:
    """Real math judgements in a process pool; the responses "hang" and "crash" get judges that do."""

    def __init__(self):
        # Preloaded as the task's pool does: an import inside a judgement would count against its time.
        self.pool = ProcessJudgePool(
            2, timeout_s=5.0, preload=("sparrow_megatron.reward.math_reward", "math_verify")
        )
        self.done = 0
        self.lock = threading.Lock()

    def prompts(self, split, start, count):
        return [Prompt(i, f"q{i}", example="2") for i in range(start, start + count)]

    def submit_reward(self, prompt, response):
        fn = {"hang": judges.hang, "crash": judges.crash}.get(response, math_reward_value)
        args = (response, prompt.example) if fn is math_reward_value else (response,)
        future = self.pool.submit(fn, *args)
        future.add_done_callback(lambda _: self._count())
        return future

    def _count(self):
        with self.lock:
            self.done += 1


class _Fleet:
    """Hands each sample to on_sample as it "completes", then holds the batch open until every judgement
    is done: if judging waited for generate() to return, they would never be."""

    def __init__(self, task, responses):
        self.task, self.responses = task, responses
        self.judged_before_return = None

    def generate(self, prompts, sampling, n=1, schedule=None, on_sample=None):
        groups = []
        for i in range(len(prompts)):
            group = []
            for j in range(n):
                out = [ord(c) for c in self.responses[i * n + j]]
                s = Sample(
                    i, j, list(prompts[i]), out, [0.0] * len(out), [], [], "stop", 0, 0, None, None, 0.0
                )
                on_sample(s)
                group.append(s)
            groups.append(group)
        deadline = time.monotonic() + 60
        while self.task.done < len(self.responses) and time.monotonic() < deadline:
            time.sleep(0.01)
        self.judged_before_return = self.task.done
        return GenerationResult(groups)


def test_collect_judges_while_generating_and_counts_failed_judgements():
    cfg = JobConfig()
    cfg.loop.prompts_per_step, cfg.rollout.n_samples = 2, 3
    responses = ["\\boxed{2}", "hang", "\\boxed{3}", "crash", "\\boxed{2}", "\\boxed{ 2 }"]
    task = _MathTask()
    fleet = _Fleet(task, responses)
    try:
        got = collect(1, cfg, task, _Tokenizer(), fleet, SamplingParams(), None)
    finally:
        task.pool.close()
    assert fleet.judged_before_return == 6  # every judgement finished while generate() still ran
    assert got.rewards == [1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    assert got.judge_errors == 2 and got.judge_error_reasons == {"timeout": 1, "crashed": 1}
    m = got.metrics()
    assert m["reward/judge_errors"] == 2 and m["reward/judge_errors/timeout"] == 1
    assert m["reward/judge_errors/crashed"] == 1 and m["reward/judge_errors/died"] == 0
    assert 0 <= m["time/reward_s"] < 60 and got.group_ids == [0, 0, 0, 1, 1, 1]


# Each program holds until 2 programs run at once (or all 4 have started) and leaves the most it saw.
RENDEZVOUS = """
import os, time, uuid
d = {folder!r}
me = uuid.uuid4().hex
open(os.path.join(d, "active-" + me), "w").close()
open(os.path.join(d, "started-" + me), "w").close()
seen, end = 0, time.monotonic() + 20
while time.monotonic() < end:
    names = os.listdir(d)
    now = sum(n.startswith("active-") for n in names)
    seen = max(seen, now)
    if now >= 2 or sum(n.startswith("started-") for n in names) >= 4:
        break
    time.sleep(0.01)
open(os.path.join(d, "seen-%d-%s" % (seen, me)), "w").close()
os.unlink(os.path.join(d, "active-" + me))
print("ok")
"""


def test_code_responses_are_judged_side_by_side_in_the_sandbox_pool(tmp_path):
    from sparrow_megatron.config import load_config
    from sparrow_megatron.data.datasets import load_tokenizer
    from sparrow_megatron.data.recall import TINY_RECALL_DIR
    from sparrow_megatron.loop.tasks import make_task

    train = tmp_path / "train.jsonl"
    row = {"question": "Print ok.", "input_output": {"inputs": [""], "outputs": ["ok\n"]}}
    train.write_text(json.dumps(row) + "\n")
    folder = tmp_path / "markers"
    folder.mkdir()
    cfg = load_config(
        "recipes/qwen3_1p7b_code.py",
        [f"model.hf_dir={TINY_RECALL_DIR}", f"data.train_path={train}", "data.max_prompt_tokens=256",
         "data.max_response_tokens=64", "cluster.executor=local", "reward.isolation=unsafe",
         "reward.workers=2", "reward.timeout_s=30"],
    )  # fmt: skip
    task = make_task(cfg, load_tokenizer(TINY_RECALL_DIR))
    try:
        (prompt,) = task.prompts("train", 0, 1)
        response = "```python\n" + RENDEZVOUS.format(folder=str(folder)) + "```"
        judged = [f.result() for f in [task.submit_reward(prompt, response) for _ in range(4)]]
    finally:
        task.close()
    assert [(j.reward, j.error) for j in judged] == [(1.0, "")] * 4
    # 2 programs ran at once (the pool's 2 sandboxes: a serial judge would never see 2), never more.
    seen = [int(p.name.split("-")[1]) for p in folder.glob("seen-*")]
    assert len(seen) == 4 and max(seen) == 2 and all(1 <= s <= 2 for s in seen)


def test_code_judge_failure_scores_0_as_crashed(monkeypatch):
    from sparrow_megatron.loop import tasks
    from sparrow_megatron.reward import code_reward as cr
    from sparrow_megatron.reward.judge_pool import ThreadJudgePool

    def broken(*args, **kwargs):
        raise OSError("the sandbox could not start")

    monkeypatch.setattr(cr, "run_program", broken)
    tests = cr.parse_tests({"inputs": [""], "outputs": ["1\n"]})
    config = cr.CodeRewardConfig()
    pool = ThreadJudgePool(1)
    try:
        j = pool.submit(tasks._judged_code, "```python\nprint(1)\n```", tests, config, None).result()
    finally:
        pool.close()
    assert (j.reward, j.error) == (0.0, "crashed") and "OSError" in j.detail
