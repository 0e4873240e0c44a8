from __future__ import annotations

import pytest

from sglang_patches import platform


def test_platform_is_opt_in(monkeypatch):
    monkeypatch.delenv(platform.ENV_FLAG, raising=False)
    assert platform.activate() is None
    monkeypatch.setenv(platform.ENV_FLAG, "1")
    assert platform.activate() == "sglang_patches.platform.SparrowCpuPlatform"


def test_entry_points_registered():
    from importlib.metadata import entry_points

    platforms = {ep.value for ep in entry_points(group="sglang.srt.platforms")}
    plugins = {ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert "sglang_patches.platform:activate" in platforms
    assert "sglang_patches.plugin:register" in plugins


def test_platform_class_is_out_of_tree_cpu():
    cpu = platform.SparrowCpuPlatform()
    assert cpu.is_out_of_tree()
    assert cpu.device_type == "cpu"
    assert cpu.get_default_attention_backend() == "torch_native"
    assert not cpu.is_pin_memory_available()


@pytest.mark.sglang
def test_real_server_generates_on_cpu(torch_native_server):
    status, out = torch_native_server.generate("hello world", max_new_tokens=8)
    assert status == 200, out
    assert len(out["output_ids"]) == 8
    assert len(out["meta_info"]["output_token_logprobs"]) == 8
