"""The judge pools: N judgements at once (counted by the judges themselves, not timed), a hung
judgement killed and scored 0, a crashing or dying judge scored 0 with its reason, processes reused."""

import pytest

from sparrow_megatron.reward.judge_pool import CRASHED, DIED, TIMEOUT, ProcessJudgePool, ThreadJudgePool
from tests.reward import judges


@pytest.fixture(scope="module")
def pool():
    # One pool for the module: its 2 processes start once (spawn) and serve every test, as across steps.
    p = ProcessJudgePool(workers=2, timeout_s=10.0)
    yield p
    p.close()


def test_process_pool_runs_workers_judgements_at_once_and_never_more(pool, tmp_path):
    futures = [pool.submit(judges.rendezvous, str(tmp_path), 2, 5) for _ in range(5)]
    seen = [f.result().reward for f in futures]
    assert max(seen) == 2 and all(1 <= s <= 2 for s in seen)
    assert all(not f.result().error for f in futures)


def test_hung_judgement_is_killed_scores_0_and_the_pool_goes_on(pool):
    before = {pool.submit(judges.pid, "").result().reward for _ in range(4)}
    pool.timeout_s = 1.0
    try:
        hung = pool.submit(judges.hang, "").result()
    finally:
        pool.timeout_s = 10.0
    assert (hung.reward, hung.error) == (0.0, TIMEOUT) and "killed" in hung.detail
    after = {pool.submit(judges.pid, "").result().reward for _ in range(4)}
    assert len(after) == 2 and len(after - before) == 1  # the killed process was replaced, the other kept


def test_crashing_and_dying_judges_score_0_with_their_reason(pool):
    crashed = pool.submit(judges.crash, "").result()
    assert (crashed.reward, crashed.error) == (0.0, CRASHED) and "ValueError" in crashed.detail
    died = pool.submit(judges.die, "").result()
    assert (died.reward, died.error) == (0.0, DIED) and "exit code 3" in died.detail
    assert pool.submit(judges.pid, "").result().error == ""


def test_real_math_judge_in_the_pool(pool):
    from sparrow_megatron.reward.math_reward import math_reward_value

    right = pool.submit(math_reward_value, "so \\boxed{\\frac{1}{2}}", "0.5").result()
    wrong = pool.submit(math_reward_value, "\\boxed{3}", "2").result()
    assert (right.reward, right.error, wrong.reward, wrong.error) == (1.0, "", 0.0, "")


def test_thread_pool_crash_is_a_counted_zero_and_fatal_errors_go_up():
    class Refused(RuntimeError):
        pass

    def refuse(_):
        raise Refused("no isolation")

    pool = ThreadJudgePool(workers=2, fatal=(Refused,))
    try:
        crashed = pool.submit(judges.crash, "").result()
        assert (crashed.reward, crashed.error) == (0.0, CRASHED)
        with pytest.raises(Refused):
            pool.submit(refuse, "").result()
    finally:
        pool.close()


def test_a_judge_that_cannot_start_stops_the_step_instead_of_scoring_0():
    from sparrow_megatron.reward.judge_pool import JudgeUnavailable

    broken = ProcessJudgePool(workers=1, timeout_s=10.0, preload=("no_such_module_for_judging",))
    try:
        with pytest.raises(JudgeUnavailable, match="ModuleNotFoundError.*no_such_module_for_judging"):
            broken.submit(judges.pid, "").result()
    finally:
        broken.close()
