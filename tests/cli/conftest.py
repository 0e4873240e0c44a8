import pytest

from sparrow_megatron.cli.main import main


@pytest.fixture
def sparrow(capsys):
    """Run the CLI in-process: returns (exit code, stdout, stderr)."""

    def run(*argv: str):
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run
