"""Options and key=value overrides mix in any order on every command (the real `sparrow` parser)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparrow_megatron.cli.main import build_parser, main
from tests.cli.test_submit import SPEC


@pytest.mark.parametrize(
    "argv",
    [
        ["submit", "R", "--dry-run", "a.b=1", "c.d=2", "--executor", "local"],
        ["submit", "--dry-run", "R", "a.b=1", "--executor", "local", "c.d=2"],
        ["submit", "R", "a.b=1", "c.d=2", "--dry-run", "--executor=local"],
    ],
)
def test_submit_options_anywhere(argv):
    args = build_parser().parse_args(argv)
    assert (args.spec, args.overrides, args.dry_run, args.executor) == (
        "R",
        ["a.b=1", "c.d=2"],
        True,
        "local",
    )


@pytest.mark.parametrize(
    "argv",
    [["train", "R", "--resume", "a.b=1", "c.d=2"], ["train", "--resume", "R", "a.b=1", "c.d=2"]],
)
def test_train_options_anywhere(argv):
    args = build_parser().parse_args(argv)
    assert (args.recipe, args.overrides, args.resume) == ("R", ["a.b=1", "c.d=2"], True)


def test_plan_options_anywhere():
    args = build_parser().parse_args(["plan", "R", "--json", "a.b=1", "--hardware", "h200", "c.d=2"])
    assert (args.recipe, args.overrides, args.json, args.hardware) == ("R", ["a.b=1", "c.d=2"], True, "h200")


def test_nested_commands_still_parse():
    args = build_parser().parse_args(["schedule", "show", "qwen3-8b-0.86", "--json"])
    assert args.json and args.schedule == ["qwen3-8b-0.86"]


def test_submit_dry_run_between_overrides_end_to_end(tmp_path, capsys):
    path = tmp_path / "spec.py"
    path.write_text(SPEC.format(job_dir=str(tmp_path / "jobs")))
    assert main(["submit", str(path), "--dry-run", "trainer.nodes=4", "cluster.account=research"]) == 0
    out = capsys.readouterr().out
    script = next(line.split()[-1] for line in out.splitlines() if line.startswith("sbatch:"))
    text = Path(script).read_text()
    assert "#SBATCH --nodes=4" in text and "#SBATCH --account=research" in text
