import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sparrow_megatron.errors import UserError
from sparrow_megatron.trainer import RolloutBatch
from sparrow_megatron.trainer.weights import HFCheckpoint
from tests.trainer.policy_args import make_policy


def _shard(src, dst):
    """Re-save src as a two-file sharded checkpoint with an index."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = load_file(str(src / "model.safetensors"))
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(dst / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, fname))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def test_sharded_checkpoint_loads_like_the_single_file(tiny_tied, tmp_path):
    sharded = _shard(tiny_tied, tmp_path / "sharded")
    batch = RolloutBatch([[5, 6, 7]], [[8, 9, 10]])
    a = make_policy(str(tiny_tied)).score(batch, top_k=0).logprobs[0]
    b = make_policy(str(sharded)).score(batch, top_k=0).logprobs[0]
    assert torch.equal(a, b)


def test_missing_shard_is_named(tiny_tied, tmp_path):
    sharded = _shard(tiny_tied, tmp_path / "sharded")
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(UserError, match="missing.*model-00002-of-00002.safetensors"):
        HFCheckpoint(sharded)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no \\*.safetensors"):
        HFCheckpoint(empty)


def test_missing_tensor_and_shape_mismatch_are_named(tiny_tied, tmp_path):
    bad = tmp_path / "bad_shape"
    shutil.copytree(tiny_tied, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 128  # weights have 192
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="mlp.gate_proj.weight.*expected \\(256, 64\\)"):
        make_policy(str(bad))

    missing = tmp_path / "missing_tensor"
    shutil.copytree(tiny_tied, missing)
    tensors = load_file(str(missing / "model.safetensors"))
    del tensors["model.layers.2.self_attn.k_norm.weight"]
    save_file(tensors, str(missing / "model.safetensors"))
    with pytest.raises(UserError, match="'model.layers.2.self_attn.k_norm.weight' not found"):
        make_policy(str(missing))


def test_iter_hf_weights_streams_buckets_of_the_whole_model(tiny_untied):
    policy = make_policy(str(tiny_untied))
    buckets = list(policy.iter_hf_weights(bucket_bytes=50_000))
    assert len(buckets) > 1
    assert all(sum(t.numel() * t.element_size() for _, t in b[:-1]) < 50_000 for b in buckets)
    streamed = {name: t for b in buckets for name, t in b}
    original = load_file(str(tiny_untied / "model.safetensors"))
    assert set(streamed) == set(original)
    assert all(torch.equal(streamed[k], original[k]) for k in original)
