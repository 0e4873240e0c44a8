from pathlib import Path

from sparrow_megatron.cli.train import print_summary
from sparrow_megatron.config import JobConfig
from sparrow_megatron.loop.run import RunSummary, StepResult


def test_summary_shows_reward_ends_evaluations_and_tails(capsys):
    steps = [StepResult(s, {"reward/mean": s / 10, "tail_bin_01024/p5": 0.9}, None) for s in range(1, 11)]
    evals = [(0, {"eval/n": 4, "eval/aime/dense/mean_at_4": 0.5, "eval/aime/dense/pass_at_4": 0.25,
                  "eval/aime/dense/pass_at_2": 0.2}),
             (10, {"eval/n": 4, "eval/aime/dense/mean_at_4": 0.75, "eval/aime/dense/pass_at_4": 0.5,
                   "eval/aime/dense/pass_at_2": 0.4})]  # fmt: skip
    summary = RunSummary(Path("runs/x"), steps, "sqlite:///runs/x/mlflow.db", "mlflow ui", evals=evals)
    print_summary(summary, JobConfig())
    out = capsys.readouterr().out
    assert "0.100 -> 1.000" in out  # first -> last step
    assert "0.300 -> 0.800" in out  # mean of steps 1-5 -> 6-10
    assert "eval aime dense mean@4 (step 0 -> 10)" in out and "0.500 -> 0.750" in out
    assert "eval aime dense pass@4" in out and "0.250 -> 0.500" in out
    assert "pass@2" not in out  # the headline: mean@n, pass@1 and pass@n
    assert "p5 acceptance, bin from 1024" in out and "0.900 (tau 0.86)" in out
