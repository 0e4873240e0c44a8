"""When the backend routes sparse decode through the kernels seam (`sglang_patches.gpu`)."""

from __future__ import annotations

import pytest

from sglang_patches.gpu import KERNELS_ENV, kernels_wanted, load_kernel_decode
from sparrow_megatron.errors import UserError


@pytest.fixture
def env(monkeypatch):
    monkeypatch.delenv(KERNELS_ENV, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return monkeypatch


def test_cuda_uses_kernels_unless_turned_off(env):
    assert kernels_wanted("cuda")
    env.setenv(KERNELS_ENV, "0")
    assert not kernels_wanted("cuda")


def test_cpu_uses_kernels_only_when_asked_under_the_interpreter(env):
    assert not kernels_wanted("cpu")
    env.setenv(KERNELS_ENV, "1")
    with pytest.raises(UserError, match="TRITON_INTERPRET=1"):
        kernels_wanted("cpu")
    env.setenv("TRITON_INTERPRET", "1")
    assert kernels_wanted("cpu")


def test_bad_flag_is_named(env):
    env.setenv(KERNELS_ENV, "yes")
    with pytest.raises(UserError, match=KERNELS_ENV):
        kernels_wanted("cuda")


def test_entry_point_is_the_kernel_decode_path():
    from sglang_patches.kernel_decode import kernel_decode

    assert load_kernel_decode(required=True) is kernel_decode
