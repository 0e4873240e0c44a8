import torch

from sparrow_megatron.rollout.weights import encode_named_tensors, rebucket, tensor_update_payload


def test_payload_decodes_with_sglangs_own_deserializer():
    # The server side of /update_weights_from_tensor: SafeUnpickler over base64 bytes.
    from sglang.srt.utils.common import MultiprocessingSerializer

    tensors = [("model.layers.0.mlp.up_proj.weight", torch.randn(4, 3)),
               ("model.norm.weight", torch.randn(5).to(torch.bfloat16))]  # fmt: skip
    decoded = MultiprocessingSerializer.deserialize(encode_named_tensors(tensors))
    assert [n for n, _ in decoded] == [n for n, _ in tensors]
    for (_, got), (_, want) in zip(decoded, tensors, strict=True):
        assert got.dtype == want.dtype
        assert torch.equal(got, want)


def test_payload_has_one_copy_per_engine_and_the_version():
    payload = tensor_update_payload([("w", torch.zeros(2))], tp_size=2, weight_version=7)
    assert len(payload["serialized_named_tensors"]) == 1
    assert payload["weight_version"] == "7"
    legacy = tensor_update_payload([("w", torch.zeros(2))], tp_size=2, weight_version=7, single_copy=False)
    assert len(legacy["serialized_named_tensors"]) == 2


def test_every_engine_tp_rank_reads_the_single_copy(monkeypatch):
    """The plugin's hook before SGLang's deserialize_own_rank, which indexes the list by TP rank."""
    import types

    import sglang.srt.runtime_context as rc

    from sglang_patches.plugin import _one_copy_for_all_ranks

    for rank in range(4):
        monkeypatch.setattr(rc, "get_parallel", lambda r=rank: types.SimpleNamespace(tp_rank=r))
        (_, entries), _ = _one_copy_for_all_ranks("worker", [b"x"])
        assert entries[rank] == b"x"
    (_, entries), _ = _one_copy_for_all_ranks("worker", [b"a", b"b"])  # one per rank: unchanged
    assert entries == [b"a", b"b"]


def test_flatten_bucket_is_sglangs_flattened_layout():
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    from sparrow_megatron.rollout.weights import flatten_bucket

    bucket = [("a", torch.randn(3, 4)), ("b", torch.randn(5).to(torch.bfloat16)), ("c", torch.arange(6.0))]
    flat, meta = flatten_bucket(bucket)
    assert flat.dtype == torch.uint8 and flat.numel() == 48 + 10 + 24
    got = FlattenedTensorBucket.empty(meta["names"], meta["dtypes"], meta["shapes"], "cpu")
    got.get_flattened_tensor().copy_(flat)
    received = dict(got.reconstruct_tensors())
    assert set(received) == {"a", "b", "c"}
    for name, want in bucket:
        assert received[name].dtype == want.dtype and torch.equal(received[name], want)


def test_rebucket_respects_the_byte_limit_and_keeps_order():
    named = [(f"t{i}", torch.zeros(10)) for i in range(5)]  # 40 bytes each
    buckets = list(rebucket(named, max_bytes=100))
    assert [[n for n, _ in b] for b in buckets] == [["t0", "t1"], ["t2", "t3"], ["t4"]]
    big = list(rebucket([("big", torch.zeros(100))], max_bytes=8))
    assert len(big) == 1
