"""One trainer step of a Qwen3-1.7B-shaped policy at 32K+ response tokens on one GPU, against the plan
(issue 15, item 8).

    python bench/trainer_step.py                 # Qwen3-1.7B shape, random init, 1024 + 32768 tokens
    python bench/trainer_step.py --self-test     # a tiny shape on CPU: the same code path, checked

Random initialisation (Megatron's own: no checkpoint is read), bf16, full recompute (1 layer per
checkpoint), one packed sample, the distributed optimizer; the layers are Megatron's local spec with
this project's SDPA core attention and RMSNorm (`trainer/model.py`), which is what runs where Transformer
Engine is absent (the GPU check machine). Reports the peak of torch.cuda.max_memory_allocated over two
GRPO steps (the first allocates Adam's state) against `sparrow plan`'s prediction for the same shape
with the local layer spec (`plan.memory.stage_memory`, without its `runtime` allowance for the CUDA
context and NCCL, which the allocator does not count), their ratio (target: within 15%), and the second
step's tokens/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

GIB = 2**30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen3-1.7b", help="a Qwen3 size of sparsity.cost.MODELS")
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--response", type=int, default=32768)
    p.add_argument("--logprob-chunk", type=int, default=4096)
    p.add_argument("--out", default="bench/results/trainer_step", help="path stem of the .json/.md")
    p.add_argument("--self-test", action="store_true", help="tiny shape on CPU, checked")
    return p.parse_args(argv)


def write_config(shape, out_dir: Path, max_positions: int) -> None:
    """A Qwen3 config.json of `shape` (no weights: the model is randomly initialised)."""
    config = {
        "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "num_hidden_layers": shape.num_layers,
        "hidden_size": shape.hidden_size, "intermediate_size": shape.intermediate_size,
        "num_attention_heads": shape.num_heads, "num_key_value_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim, "vocab_size": shape.vocab_size, "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0, "tie_word_embeddings": shape.tied_embeddings,
        "max_position_embeddings": max_positions, "attention_bias": False, "hidden_act": "silu",
    }  # fmt: skip
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))


def run(args) -> dict:
    from sparrow_megatron.plan.memory import stage_memory
    from sparrow_megatron.plan.shapes import TrainerShape
    from sparrow_megatron.sparsity.cost import MODELS, ModelShape
    from sparrow_megatron.trainer import RolloutBatch
    from sparrow_megatron.trainer import policy as policy_module
    from sparrow_megatron.trainer.config import GRPOConfig, TrainerConfig

    cuda = torch.cuda.is_available()
    if args.self_test:
        shape = ModelShape("tiny", 2, 64, 4, 2, 16, 192, 256, True)
        args.prompt, args.response, args.logprob_chunk = 16, 112, 32
    else:
        if not cuda:
            sys.exit("bench/trainer_step.py needs a CUDA GPU; on CPU run it with --self-test")
        shape = MODELS[args.model.lower()]
    tokens = args.prompt + args.response
    trainer = TrainerConfig(
        dtype="bf16" if cuda else "fp32", recompute="full", recompute_num_layers=1,
        micro_batch_tokens=tokens, logprob_chunk_tokens=args.logprob_chunk,
    )  # fmt: skip
    model_dir = Path(tempfile.mkdtemp(prefix="trainer_step_"))
    write_config(shape, model_dir, max(tokens, 40960))
    # Random init: Megatron initialises the parameters; there is no checkpoint to read.
    policy_module.load_hf_weights = lambda *a, **k: None
    policy = policy_module.Policy(trainer, GRPOConfig(), model_dir=str(model_dir), pack_sequences=True)

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, shape.vocab_size, (args.prompt,), generator=g).tolist()
    response = torch.randint(0, shape.vocab_size, (args.response,), generator=g).tolist()
    logprobs = [-2.0] * args.response
    batch = RolloutBatch([prompt], [response], [logprobs], [1.0])
    batch.old_logprobs = [torch.tensor(logprobs)]

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    metrics = policy.train_step(batch)  # allocates Adam's state
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    metrics = policy.train_step(batch)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else None

    plan_shape = TrainerShape(
        model=shape, micro_batch_tokens=tokens, logprob_chunk_tokens=args.logprob_chunk,
        recompute="full", recompute_num_layers=1, distributed_optimizer=True, layer_spec="local",
    )  # fmt: skip
    terms = stage_memory(plan_shape, 0).terms
    predicted = sum(v for k, v in terms.items() if k != "runtime")
    return {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "model": shape.name,
        "prompt": args.prompt,
        "response": args.response,
        "recompute": "full",
        "peak_allocated_gib": None if peak is None else round(peak / GIB, 3),
        "plan_gib": round(predicted / GIB, 3),
        "plan_terms_gib": {k: round(v / GIB, 3) for k, v in terms.items()},
        "measured_over_plan": None if peak is None else round(peak / predicted, 3),
        "within_15_percent": None if peak is None else abs(peak / predicted - 1) <= 0.15,
        "step_seconds": round(seconds, 3),
        "tokens_per_second": round(tokens / seconds, 1),
        "loss": metrics["loss"],
    }


def markdown(r: dict) -> str:
    return "\n".join([
        f"Trainer step, {r['model']} shape (random init), {r['prompt']} + {r['response']} tokens, full recompute, "
        f"{r['device']}",
        "",
        "| peak allocated GiB | plan GiB (local spec, no runtime allowance) | measured / plan | within 15% | tokens/s |",
        "|---|---|---|---|---|",
        f"| {r['peak_allocated_gib']} | {r['plan_gib']} | {r['measured_over_plan']} | {r['within_15_percent']} "
        f"| {r['tokens_per_second']} |",
        "",
    ])  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    report = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(json.dumps(report["plan_terms_gib"]))
    if args.self_test:
        ok = report["plan_gib"] > 0 and report["tokens_per_second"] > 0 and report["loss"] == report["loss"]
        print("trainer step self-test ok" if ok else "trainer step self-test FAILED")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
