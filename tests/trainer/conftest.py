import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sparrow_megatron.models.tiny import TinyQwen3Shape, make_tiny_qwen3  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tied(tmp_path_factory):
    return make_tiny_qwen3(tmp_path_factory.mktemp("tiny_tied"), TinyQwen3Shape(), seed=0)


@pytest.fixture(scope="session")
def tiny_untied(tmp_path_factory):
    shape = TinyQwen3Shape(tie_word_embeddings=False)
    return make_tiny_qwen3(tmp_path_factory.mktemp("tiny_untied"), shape, seed=1)
