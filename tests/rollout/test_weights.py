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


def test_payload_has_one_copy_per_tp_rank_and_the_version():
    payload = tensor_update_payload([("w", torch.zeros(2))], tp_size=2, weight_version=7)
    assert len(payload["serialized_named_tensors"]) == 2
    assert payload["weight_version"] == "7"


def test_rebucket_respects_the_byte_limit_and_keeps_order():
    named = [(f"t{i}", torch.zeros(10)) for i in range(5)]  # 40 bytes each
    buckets = list(rebucket(named, max_bytes=100))
    assert [[n for n, _ in b] for b in buckets] == [["t0", "t1"], ["t2", "t3"], ["t4"]]
    big = list(rebucket([("big", torch.zeros(100))], max_bytes=8))
    assert len(big) == 1
