import io

from rich.console import Console

from sparrow_megatron.loop.console import LoopProgress, step_fields


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=terminal, width=160, color_system=None), buf


def test_step_fields_mark_p5_below_tau():
    fields = step_fields({"reward/mean": 0.5, "tail/p5_min": 0.8, "rollout/tokens_per_s": 1234.6}, tau=0.86)
    assert fields == {"reward": "0.500", "p5": "[bold red]0.800[/]", "tps": "1235"}
    assert step_fields({"tail/p5_min": 0.9}, tau=0.86)["p5"] == "0.900"
    assert step_fields({}, tau=0.86) == {"reward": "-", "p5": "-", "tps": "-"}


def test_plain_lines_when_not_a_terminal():
    console, buf = _console(terminal=False)
    with LoopProgress(3, console=console) as progress:
        progress.update(1, {"reward/mean": 0.25, "tail/p5_min": 0.91, "rollout/tokens_per_s": 100.0})
        progress.update(2, {"reward/mean": 0.5, "tail/p5_min": 0.8})
    lines = buf.getvalue().splitlines()
    assert lines == [
        "step 1/3  reward 0.250  p5 min 0.910  100 tok/s",
        "step 2/3  reward 0.500  p5 min 0.800  - tok/s",
    ]


def test_live_bar_on_a_terminal():
    console, buf = _console(terminal=True)
    with LoopProgress(4, start_step=1, console=console) as progress:
        assert progress.live
        progress.update(2, {"reward/mean": 0.75, "tail/p5_min": 0.95, "rollout/tokens_per_s": 50.0})
        task = progress._progress.tasks[0]
        assert task.completed == 2 and task.fields["reward"] == "0.750"
    out = buf.getvalue()
    assert "2/4" in out and "reward 0.750" in out and "p5 min 0.950" in out


def test_announce_says_fresh_start_or_the_resume_step():
    console, buf = _console(terminal=False)
    progress = LoopProgress(5, console=console)
    progress.announce("runs/x", None)
    progress.announce("runs/x", 3)
    assert buf.getvalue().splitlines() == [
        "starting runs/x: steps 1..5",
        "resuming runs/x from step 3 (its checkpoint): steps 4..5",
    ]


def test_library_chatter_goes_to_the_log_file_and_each_event_to_the_console_once(tmp_path):
    import logging
    import warnings

    from sparrow_megatron.loop.console import route_logs

    stream = io.StringIO()
    undo = route_logs(tmp_path / "run" / "train.log", stream)
    try:
        logging.getLogger("megatron.core.distributed.param_and_grad_buffer").info("Params for bucket 1")
        warnings.warn("Transformer Engine not found, falling back to local layers", UserWarning, stacklevel=1)
        logging.getLogger("sparrow_megatron.rollout.fleet").info("engine 0 up")
        logging.getLogger("sparrow_megatron.loop.controller").info("step 1: budget 256 -> 384")
        logging.getLogger("sparrow.loop").warning("step 1: 2 samples left out")
        logging.getLogger("megatron.core").error("a library error")
    finally:
        undo()
    console = stream.getvalue()
    log = (tmp_path / "run" / "train.log").read_text()
    for text in ("Params for bucket 1", "UserWarning: Transformer Engine", "engine 0 up", "budget 256 -> 384",
                 "samples left out", "a library error"):  # fmt: skip
        assert log.count(text) == 1, text
    assert "engine 0 up" in console and "samples left out" in console and "a library error" in console
    # The recorder prints controller decisions itself; the library's chatter stays in the file.
    for text in ("Params for bucket", "Transformer Engine", "budget 256 -> 384"):
        assert text not in console


def test_an_event_in_a_log_stays_one_line():
    buf = io.StringIO()
    progress = LoopProgress(2, console=Console(file=buf, force_terminal=False, width=40, color_system=None))
    progress.announce("/a/rather/long/path/to/the/run/directory/of/this/job", None)
    progress.print("eval after step 0 (k=2): dense mean@k 0.000 pass@k 0.000, sparse mean@k 0.000")
    assert len(buf.getvalue().splitlines()) == 2
