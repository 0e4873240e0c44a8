import threading

import pytest

from sparrow_megatron.reward.math_reward import (
    CORRECT,
    NO_ANSWER,
    UNFINISHED_THINKING,
    UNPARSABLE_ANSWER,
    UNPARSABLE_GOLD,
    WRONG,
    final_answer_part,
    last_boxed,
    math_reward,
)


@pytest.mark.parametrize(
    ("response", "answer"),
    [
        ("so the answer is \\boxed{\\frac{1}{2}}", "0.5"),
        ("\\boxed{1/2}", "\\frac12"),
        ("\\boxed{x^2+2x+1}", "(x+1)^2"),
        ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}"),
        ("\\boxed{\\{1,2\\}}", "\\{2,1\\}"),
        ("$\\boxed 5$", "5"),
        ("\\fbox{42}", "42"),
        ("\\boxed{27}", "\\boxed{27}"),
    ],
)
def test_symbolically_equal_answers_get_one(response, answer):
    score = math_reward(response, answer)
    assert (score.reward, score.reason) == (1.0, CORRECT)


def test_string_match_is_not_enough_and_wrong_values_get_zero():
    assert math_reward("\\boxed{0.333}", "\\frac{1}{3}").reason == WRONG
    assert math_reward("\\boxed{3}", "4").to_dict() == {"reward": 0, "reason": WRONG, "extracted": "3"}


def test_last_boxed_answer_is_graded():
    assert math_reward("first \\boxed{3}, finally \\boxed{4}", "4").reward == 1.0
    assert math_reward("first \\boxed{3}, finally \\boxed{4}", "3").reward == 0.0
    assert last_boxed("\\boxed{\\frac{a}{b^{2}}} end") == "\\frac{a}{b^{2}}"


def test_thinking_part_is_ignored():
    response = "<think>maybe \\boxed{7}</think>The answer is \\boxed{8}."
    assert math_reward(response, "8").reward == 1.0
    assert math_reward(response, "7").reward == 0.0
    assert math_reward("<think>I guess \\boxed{7}</think>no box here", "7").reason == NO_ANSWER
    assert final_answer_part("<think>still thinking \\boxed{7}") is None
    assert math_reward("<think>still thinking \\boxed{7}", "7").reason == UNFINISHED_THINKING


@pytest.mark.parametrize(
    ("response", "answer", "reason"),
    [
        ("the answer is 5", "5", NO_ANSWER),
        ("\\boxed{}", "5", NO_ANSWER),
        ("\\boxed{5", "5", NO_ANSWER),
        ("\\boxed{@@##}", "3", UNPARSABLE_ANSWER),
        ("\\boxed{3}", "@@@", UNPARSABLE_GOLD),
    ],
)
def test_zero_rewards_have_reasons(response, answer, reason):
    score = math_reward(response, answer)
    assert (score.reward, score.reason) == (0.0, reason)


def test_works_outside_the_main_thread():
    results = []
    thread = threading.Thread(target=lambda: results.append(math_reward("\\boxed{\\frac{2}{4}}", "0.5")))
    thread.start()
    thread.join()
    assert results[0].reward == 1.0
