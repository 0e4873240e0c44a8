"""The GPU image carries what the sandbox needs (checked on the Dockerfile's text: no Docker engine here)."""

import re
from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parents[2] / "Dockerfile"


def test_image_installs_bubblewrap_and_libseccomp_before_dropping_root():
    text = DOCKERFILE.read_text()
    install = re.search(r"^RUN apt-get update && apt-get install -y [^\n]*bubblewrap libseccomp2", text, re.M)
    user = re.search(r"^USER ", text, re.M)
    assert install and user and install.start() < user.start()
    assert "sparrow reward code --check" in text
