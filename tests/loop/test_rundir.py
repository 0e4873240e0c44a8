import json
import logging
import math

import pytest
import yaml

from sparrow_megatron.config import JobConfig, load_recipe
from sparrow_megatron.errors import UserError
from sparrow_megatron.loop.rundir import RunDir
from sparrow_megatron.sparsity.schedule import PRESETS, Schedule


def test_layout_and_config(tmp_path):
    cfg = JobConfig(name="layout")
    run = RunDir(tmp_path / "run").create(cfg)
    for d in ("checkpoints", "schedules", "plots"):
        assert (tmp_path / "run" / d).is_dir()
    assert load_recipe(run.config_path) == cfg
    assert yaml.safe_load(run.config_path.read_text())["name"] == "layout"
    assert not run.exists()


def test_metrics_append_read_and_torn_line(tmp_path, caplog):
    run = RunDir(tmp_path).create()
    run.append_metrics(1, {"reward": 0.5, "tail_bin_00000/p5": 0.9})
    run.append_metrics(2, {"reward": 0.75, "kl": float("nan")})
    with open(run.metrics_path, "a") as f:
        f.write('{"step": 3, "reward": 0.')  # a kill mid-write
    caplog.set_level(logging.WARNING)
    rows = run.read_metrics()
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0] == {"step": 1, "reward": 0.5, "tail_bin_00000/p5": 0.9}
    assert math.isnan(rows[1]["kl"])
    assert "metrics.jsonl:3: skipping a malformed metrics line" in caplog.text
    # The file stays strict JSON (no NaN tokens).
    json.loads(run.metrics_path.read_text().splitlines()[1], parse_constant=lambda c: pytest.fail(c))


def test_truncate_metrics_sets_rows_aside(tmp_path):
    run = RunDir(tmp_path).create()
    for step in range(1, 6):
        run.append_metrics(step, {"reward": step / 10})
    with open(run.metrics_path, "a") as f:
        f.write('{"step": 6, "rew')
    assert run.truncate_metrics(keep_through=3) == 3
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3]
    dropped = (tmp_path / "metrics.jsonl.dropped-3").read_text().splitlines()
    assert len(dropped) == 3 and json.loads(dropped[0])["step"] == 4
    run.append_metrics(4, {"reward": 0.4})
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3, 4]
    assert run.truncate_metrics(keep_through=10) == 0


def test_last_complete_checkpoint_ignores_partial_and_unmarked(tmp_path, caplog):
    run = RunDir(tmp_path).create()
    assert run.last_complete_checkpoint() is None
    for step in (2, 4):
        d = run.begin_checkpoint(step)
        (d / "weights.bin").write_bytes(b"x" * step)
        RunDir.write_loop_state(d, {"monitor": {"streaks": {}}, "cursor": step, "p5": float("nan")})
        run.commit_checkpoint(step, {"reward": 0.1 * step})
    # A checkpoint killed mid-write (partial) and a hand-made directory without the marker.
    (run.begin_checkpoint(6) / "weights.bin").write_bytes(b"half")
    (run.checkpoints / "step_8").mkdir()
    (run.checkpoints / "step_9").mkdir()
    (run.checkpoints / "step_9" / "COMPLETE").write_text("{bad")
    (run.checkpoints / "notes.txt").write_text("x")
    caplog.set_level(logging.WARNING)
    ckpt = run.last_complete_checkpoint()
    assert ckpt.step == 4 and ckpt.path == tmp_path / "checkpoints" / "step_4"
    assert ckpt.meta == {"step": 4, "reward": pytest.approx(0.4)}
    assert (ckpt.path / "weights.bin").read_bytes() == b"xxxx"
    state = RunDir.read_loop_state(ckpt.path)
    assert state["cursor"] == 4 and math.isnan(state["p5"])
    assert "step_8: no COMPLETE marker" in caplog.text and "step_9: unreadable" in caplog.text
    assert [c.step for c in run.list_checkpoints()] == [2, 4]
    # Numeric, not lexical, order.
    run.begin_checkpoint(10)
    run.commit_checkpoint(10)
    assert run.last_complete_checkpoint().step == 10
    assert [c.step for c in run.list_checkpoints()] == [2, 4, 10]


def test_commit_requires_begin_and_loop_state_errors(tmp_path):
    run = RunDir(tmp_path).create()
    with pytest.raises(FileNotFoundError):
        run.commit_checkpoint(3)
    d = run.begin_checkpoint(3)
    with pytest.raises(UserError, match="has no loop state"):
        RunDir.read_loop_state(d)
    (d / "loop_state.json").write_text('{"a": ')
    with pytest.raises(UserError, match="loop_state.json:1: corrupt loop state"):
        RunDir.read_loop_state(d)


def test_schedule_in_force(tmp_path):
    run = RunDir(tmp_path).create()
    assert run.schedule_in_force(5) is None
    run.save_schedule(PRESETS["qwen3-1.7b-0.86"], 1)
    changed = Schedule((512, 1280), name="ctl")
    run.save_schedule(changed, 7)
    assert run.schedule_in_force(6) == tmp_path / "schedules" / "step_1.json"
    assert Schedule.load(run.schedule_in_force(7)) == changed
    assert Schedule.load(run.schedule_in_force(100)) == changed


def test_prepare_resume_after_a_kill(tmp_path):
    run = RunDir(tmp_path).create()
    assert run.prepare_resume().step == 0 and run.prepare_resume().next_step == 1
    for step in range(1, 6):
        run.append_metrics(step, {"reward": step})
        if step % 2 == 0:
            d = run.begin_checkpoint(step)
            RunDir.write_loop_state(d, {"cursor": step * 8})
            run.commit_checkpoint(step)
    run.begin_checkpoint(6)  # killed while writing step 6's checkpoint
    point = run.prepare_resume()
    assert (point.step, point.next_step, point.checkpoint.step) == (4, 5, 4)
    assert point.loop_state == {"cursor": 32}
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3, 4]


def _bookkeeping_run(run_dir, steps, checkpoint_every, kill_after=None, resume=False):
    """The loop's bookkeeping alone (monitor, controller, run dir) on a seeded synthetic tail stream."""
    import numpy as np

    from sparrow_megatron.loop.config import ControllerConfig, MonitorConfig
    from sparrow_megatron.loop.controller import BudgetController, schedule_metrics
    from sparrow_megatron.loop.monitor import TailMonitor

    run = RunDir(run_dir).create()
    # The stream gives one acceptance array, no bounds: it is the signal.
    monitor = TailMonitor(MonitorConfig(signal="estimate", consecutive_steps=2))
    controller = BudgetController(
        ControllerConfig(enabled=True, patience=2), 0.86, Schedule((512, 1024, 1536))
    )
    start = 1
    if resume:
        point = run.prepare_resume()
        if point.loop_state is not None:
            monitor.load_state_dict(point.loop_state["monitor"])
            controller.load_state_dict(point.loop_state["controller"])
        start = point.next_step
    for step in range(start, steps + 1):
        rng = np.random.default_rng(step)  # per-step seeding: a resumed step sees the same data
        positions = rng.integers(0, 6000, 900)
        alpha = rng.uniform(0.95, 1.0, 900)
        low_bin = 1 if 2 <= step <= 5 else 2  # a streak in bin 1 across the checkpoint at step 3
        low = (positions // 2000 == low_bin) & (rng.random(900) < 0.3)
        alpha[low] = 0.5
        used = controller.schedule
        tails = monitor.observe(step, alpha, positions)
        controller.update(step, tails.p5_by_bin(), 2000)
        run.append_metrics(step, {**tails.metrics(), **schedule_metrics(used)})
        if step % checkpoint_every == 0:
            d = run.begin_checkpoint(step)
            RunDir.write_loop_state(
                d, {"monitor": monitor.state_dict(), "controller": controller.state_dict()}
            )
            run.commit_checkpoint(step)
        if step == kill_after:
            run.begin_checkpoint(step + 1)  # killed while writing the next checkpoint
            return


def test_resume_reproduces_the_uninterrupted_record(tmp_path):
    _bookkeeping_run(tmp_path / "straight", steps=8, checkpoint_every=3)
    _bookkeeping_run(tmp_path / "killed", steps=8, checkpoint_every=3, kill_after=5)
    assert [r["step"] for r in RunDir(tmp_path / "killed").read_metrics()] == [1, 2, 3, 4, 5]
    _bookkeeping_run(tmp_path / "killed", steps=8, checkpoint_every=3, resume=True)
    straight = RunDir(tmp_path / "straight").read_metrics()
    resumed = RunDir(tmp_path / "killed").read_metrics()
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert resumed == straight
    assert any(r["tail/alarm"] == 1.0 for r in straight)  # the stream exercised the streak state
    assert len({r["tail_bin_02000/budget"] for r in straight}) > 1  # and the controller's
