"""LoRA on the Megatron policy: PEFT export reproduces the Megatron base+adapter logits in HF+PEFT."""

import json

import pytest
import torch

from sparrow_megatron.errors import UserError
from sparrow_megatron.trainer.lora import LoraAdapter, LoraSpec
from sparrow_megatron.trainer.policy import _causal_mask
from tests.trainer.policy_args import make_policy

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def policy(tiny_untied):
    return make_policy(str(tiny_untied))


def test_peft_export_matches_megatron_base_plus_adapter(policy, tiny_untied, tmp_path):
    from peft import PeftModel
    from transformers import Qwen3ForCausalLM

    spec = LoraSpec(rank=4, alpha=8.0, target_modules=ALL, seed=3)
    adapter = LoraAdapter(policy.model, policy.arch, spec, policy.config)
    try:
        # B starts at zero (the adapter is a no-op); give it weight so the comparison means something.
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        tokens = torch.tensor([[5, 17, 33, 2, 90, 64, 11, 7, 100, 3, 44, 45]])
        mask, pos = _causal_mask(12, tokens.device), torch.arange(12)[None]
        policy.model.eval()
        with torch.no_grad():
            base = policy.model(tokens, pos, mask)
            with adapter.enabled():
                adapted = policy.model(tokens, pos, mask)
            after = policy.model(tokens, pos, mask)
        assert torch.equal(base, after)  # outside enabled() the hooks add nothing
        assert (adapted - base).abs().max() > 1e-2

        out = adapter.export_peft(tmp_path / "adapter", base_model_path=str(tiny_untied))
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and sorted(cfg["target_modules"]) == sorted(ALL)
        hf = Qwen3ForCausalLM.from_pretrained(str(tiny_untied), dtype=torch.float32).eval()
        peft_model = PeftModel.from_pretrained(hf, str(out)).eval()
        with torch.no_grad():
            ref = peft_model(tokens).logits
            with peft_model.disable_adapter():
                ref_base = peft_model(tokens).logits
        torch.testing.assert_close(ref_base, base, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ref, adapted, rtol=1e-5, atol=1e-5)
    finally:
        adapter.remove()


def test_fused_groups_must_be_targeted_whole():
    with pytest.raises(UserError, match="together"):
        LoraSpec(target_modules=("q_proj", "o_proj")).megatron_targets()
    with pytest.raises(UserError, match="unknown"):
        LoraSpec(target_modules=("qkv",)).megatron_targets()
    assert LoraSpec().megatron_targets() == [
        ("self_attention.linear_qkv", "col"),
        ("self_attention.linear_proj", "row"),
    ]
