import io

import numpy as np
from mlflow.tracking import MlflowClient
from rich.console import Console

from sparrow_megatron.loop.config import ControllerConfig, MonitorConfig
from sparrow_megatron.loop.console import LoopProgress
from sparrow_megatron.loop.controller import BudgetController
from sparrow_megatron.loop.monitor import TailMonitor
from sparrow_megatron.loop.recorder import StepRecorder
from sparrow_megatron.loop.rundir import RunDir
from sparrow_megatron.loop.tracking import MlflowTracker
from sparrow_megatron.sparsity.schedule import Schedule


def _low_tail_step(rng, low_bin=1, bins=3, n=300):
    positions = np.concatenate([b * 2000 + rng.integers(0, 2000, n) for b in range(bins)])
    alpha = rng.uniform(0.97, 1.0, positions.size)
    idx = np.flatnonzero(positions // 2000 == low_bin)
    alpha[idx[: n // 4]] = rng.uniform(0.3, 0.6, n // 4)
    return alpha, positions


def test_low_tail_stream_through_monitor_controller_and_tracking(tmp_path, mlflow_store):
    """The loop's bookkeeping on a low-tail stream: the controller raises exactly the failing bin,
    the warning fires after k steps, and every number lands in metrics.jsonl, MLflow and the plots."""
    rng = np.random.default_rng(0)
    run = RunDir(tmp_path / "run").create()
    # The stream gives one acceptance array, no bounds: it is the signal.
    monitor = TailMonitor(MonitorConfig(signal="estimate", consecutive_steps=2))
    schedule = Schedule((512, 1024, 1536), name="start")
    controller = BudgetController(ControllerConfig(enabled=True), 0.86, schedule)
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False, width=200, color_system=None)
    with (
        MlflowTracker(f"sqlite:///{mlflow_store}", "recorder", run.root, system_metrics=False) as tracker,
        LoopProgress(4, console=console) as progress,
    ):
        tracker.start({"monitor.tau": 0.86})
        recorder = StepRecorder(run, tracker, progress, monitor, plot_every=4)
        recorder.schedule_changed(1, schedule)
        for step in range(1, 5):
            used = schedule  # the schedule this step's rollout ran under
            tails = monitor.observe(step, *_low_tail_step(rng))
            schedule, changes = controller.update(step, tails.p5_by_bin(), monitor.cfg.bin_width)
            if changes:
                recorder.schedule_changed(step + 1, schedule, changes)
            metrics = {**tails.metrics(), "reward/mean": step / 10, "rollout/tokens_per_s": 10.0}
            recorder.record(step, metrics, used)
        run_id = tracker.run_id

    assert schedule.budgets == (512, 1024 + 4 * 256, 1536)
    assert [c.bin_start for c in controller.changes] == [2000] * 4
    rows = run.read_metrics()
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["tail/alarm"] for r in rows] == [0.0, 1.0, 1.0, 1.0]
    assert all(r["tail_bin_02000/p5"] < 0.86 < r["tail_bin_00000/p5"] for r in rows)
    # The schedule each step ran under is recorded with it.
    assert [r["tail_bin_02000/budget"] for r in rows] == [1024.0, 1280.0, 1536.0, 1792.0]
    assert all(r["tail_bin_00000/budget"] == 512.0 for r in rows)
    assert Schedule.load(run.schedule_in_force(5)).budgets == schedule.budgets
    assert Schedule.load(run.schedule_in_force(1)).budgets == (512, 1024, 1536)

    client = MlflowClient(tracker.uri)
    history = sorted(client.get_metric_history(run_id, "tail_bin_02000/p5"), key=lambda m: m.step)
    assert [m.step for m in history] == [1, 2, 3, 4]
    np.testing.assert_allclose([m.value for m in history], [r["tail_bin_02000/p5"] for r in rows])
    plots = set(tracker.list_artifacts("plots"))
    assert plots == {"plots/tail_p5_heatmap.png", "plots/reward.png", "plots/schedules.png"}
    assert "metrics.jsonl" in tracker.list_artifacts()  # the durable record, as of the last plots
    assert set(tracker.list_artifacts("schedules")) == {f"schedules/step_{s}.json" for s in range(1, 6)}
    assert client.get_run(run_id).data.tags["schedule_in_force"] == "start-ctl (from step 5)"
    out = buf.getvalue()
    assert "step 1/4  reward 0.100" in out
    assert out.count("controller step") == 4 and "budget 1024 -> 1280" in out


def test_record_survives_a_tracking_failure(tmp_path, caplog):
    class Broken:
        def log_metrics(self, step, metrics):
            raise ConnectionError("server down")

    run = RunDir(tmp_path).create()
    StepRecorder(run, tracker=Broken()).record(1, {"reward/mean": 0.5})
    assert run.read_metrics() == [{"step": 1, "reward/mean": 0.5}]
    assert "MLflow logging failed (server down)" in caplog.text


def test_constants_are_params_and_every_bin_has_its_budget_from_step_1(tmp_path, mlflow_store):
    run = RunDir(tmp_path / "run").create()
    schedule = Schedule((256,), 256, name="tiny")  # one explicit bin; the tails sit in bin 1024
    with MlflowTracker(f"sqlite:///{mlflow_store}", "recorder", run.root, system_metrics=False) as tracker:
        tracker.start()
        recorder = StepRecorder(run, tracker, constant_keys=("train/lr",))
        tails = {"tail_bin_01024/count": 40.0, "tail_bin_01024/p5": 0.8, "reward/mean": 0.5, "train/lr": 1e-6}
        recorder.record(1, tails, schedule)
        recorder.record_eval(1, {"eval/n": 4.0, "eval/aime/prompts": 8.0, "eval/aime/dense/mean_at_4": 0.5})
    got = MlflowClient(tracker.uri).get_run(tracker.run_id).data
    assert got.metrics["tail_bin_01024/budget"] == 256.0 == got.metrics["tail_bin_00000/budget"]
    assert got.params["eval/n"] == "4" and got.params["eval/aime/prompts"] == "8"
    assert "eval/n" not in got.metrics and got.metrics["eval/aime/dense/mean_at_4"] == 0.5
    assert "train/lr" not in got.metrics
    rows = run.read_metrics()  # the durable record keeps whole rows
    assert rows[0]["train/lr"] == 1e-6 and rows[1]["eval/n"] == 4.0


def test_evaluations_are_their_own_rows_and_plot(tmp_path):
    run = RunDir(tmp_path / "run").create()
    recorder = StepRecorder(run)
    recorder.record(1, {"reward/mean": 0.5})
    for step, value in ((0, 0.25), (1, 0.5)):
        recorder.record_eval(
            step, {"eval/n": 4.0, "eval/aime/dense/mean_at_4": value, "eval/aime/dense/pass_at_4": 1.0}
        )
    assert [r["step"] for r in run.read_metrics()] == [1, 0, 1]
    assert {p.name for p in recorder.plots()} == {"reward.png", "eval.png"}


def test_console_prints_one_line_per_eval_set():
    from sparrow_megatron.loop.recorder import eval_lines

    metrics = {"eval/n": 4.0, "eval/aime/prompts": 30.0, "eval/math500/prompts": 500.0}
    for name, value in (("aime", 0.25), ("math500", 0.5)):
        for path in ("dense", "sparse"):
            metrics |= {f"eval/{name}/{path}/mean_at_4": value, f"eval/{name}/{path}/pass_at_1": value,
                        f"eval/{name}/{path}/pass_at_2": 0.7, f"eval/{name}/{path}/pass_at_4": 0.9}  # fmt: skip
    lines = eval_lines(8, metrics)
    assert lines == [
        "[cyan]eval[/] aime after step 8 (30 prompts x 4): dense mean@4 0.250 pass@1 0.250 pass@4 0.900, "
        "sparse mean@4 0.250 pass@1 0.250 pass@4 0.900",
        "[cyan]eval[/] math500 after step 8 (500 prompts x 4): dense mean@4 0.500 pass@1 0.500 pass@4 0.900, "
        "sparse mean@4 0.500 pass@1 0.500 pass@4 0.900",
    ]


def test_a_resumed_runs_summary_covers_the_steps_before_the_resume(tmp_path):
    from sparrow_megatron.loop.recorder import summary_rows
    from sparrow_megatron.loop.run import RunSummary, StepResult

    rows = [
        {"step": 0, "eval/n": 2, "eval/t/dense/mean_at_1": 0.25},
        {"step": 1, "reward/mean": 0.25},
        {"step": 2, "reward/mean": 0.5},
        {"step": 2, "eval/n": 2, "eval/t/dense/mean_at_1": 0.5},
        {"step": 2, "note": "a row added by hand"},  # neither a step's nor an evaluation's: left out
    ]
    summary = RunSummary(run_dir=tmp_path)
    summary.add_recorded(rows, before=3)
    summary.steps.append(StepResult(3, {"reward/mean": 0.75}, None))  # the resumed run's own step
    assert [s.step for s in summary.steps] == [1, 2, 3] and [s for s, _ in summary.evals] == [0, 2]
    table = dict(summary_rows(summary, tau=0.86))
    assert table["reward (first -> last step)"] == "0.250 -> 0.750"
    # Rows of steps at or after the resume point are not the run's (a set-aside later step).
    again = RunSummary(run_dir=tmp_path)
    again.add_recorded(rows, before=2)
    assert [s.step for s in again.steps] == [1] and [s for s, _ in again.evals] == [0]
