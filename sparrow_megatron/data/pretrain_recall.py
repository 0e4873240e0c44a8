"""Pretrain a tiny Qwen3 on the recall task to *partial* accuracy, so RL has room to improve it.

`python -m sparrow_megatron.data.pretrain_recall --out DIR` (or scripts/pretrain_tiny.py) reproduces
the committed checkpoint `sparrow_megatron/assets/tiny_recall/` (seeded; same torch build -> same
weights). Loss is on the response tokens only: the haystack is random and carries no signal. A curriculum
grows the haystack so the model first learns the search on short prompts, then on longer ones.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sparrow_megatron.data.recall import (
    EVAL,
    TRAIN,
    RecallTask,
    RecallTaskConfig,
    recall_reward,
)
from sparrow_megatron.models.tiny import TinyQwen3Shape, make_tiny_qwen3

RECALL_SHAPE = TinyQwen3Shape(
    vocab_size=128,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=4096,
)


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 250
    batch_size: int = 32
    lr: float = 5e-3
    warmup: int = 50
    weight_decay: float = 0.01
    # Long prompts cost too much on shared cores: train on haystacks up to max_len and let the search
    # carry over (imperfectly: the partial accuracy we want) to the task's full haystack_len.
    min_len: int = 16
    max_len: int = 192
    curriculum_frac: float = 0.6  # fraction of steps over which the haystack grows to max_len
    max_minutes: float = 60.0  # safety stop (still saves) past this wall time
    # Stop after this many steps of the `steps`-long schedule (0 = run it all). A run cut by
    # max_minutes after k steps is reproduced exactly by stop_after=k (recorded as steps_done).
    stop_after: int = 0
    # One thread: on shared cores two OpenMP threads spin on barriers and ran ~10x slower here.
    threads: int = 1
    seed: int = 0
    eval_examples: int = 64


def _length_at(step: int, cfg: PretrainConfig, rng: random.Random) -> int:
    ramp = min(1.0, step / max(1, cfg.curriculum_frac * cfg.steps))
    longest = int(cfg.min_len + ramp * (cfg.max_len - cfg.min_len))
    # Half of the batches at the current maximum, half below it: keeps the short-prompt skill.
    return longest if rng.random() < 0.5 else rng.randint(cfg.min_len, longest)


def _batch(task: RecallTask, tokenizer, start: int, size: int, haystack_len: int):
    import torch

    ids, masks = [], []
    for i in range(start, start + size):
        ex = task.example(TRAIN, i, haystack_len=haystack_len)
        prompt = tokenizer(ex.prompt_text(tokenizer), add_special_tokens=False)["input_ids"]
        answer = tokenizer(ex.answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        ids.append(prompt + answer)
        masks.append([0] * len(prompt) + [1] * len(answer))
    # Same haystack length -> same length for every example of the batch.
    return torch.tensor(ids), torch.tensor(masks, dtype=torch.bool)


def greedy_rewards(model, tokenizer, task: RecallTask, count: int, batch_size: int = 16) -> list[float]:
    """Per-example recall reward of dense greedy decoding on the first `count` eval examples."""
    import torch

    was_training = model.training
    model.eval()
    scores: list[float] = []
    examples = task.examples(EVAL, count)
    with torch.no_grad():
        for b in range(0, count, batch_size):
            chunk = examples[b : b + batch_size]
            texts = [ex.prompt_text(tokenizer) for ex in chunk]
            # Every prompt of the task has the same length: no padding needed.
            input_ids = torch.tensor([tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts])
            out = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=len(chunk[0].answer) + 1,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            for ex, row in zip(chunk, out[:, input_ids.shape[1] :], strict=True):
                scores.append(recall_reward(tokenizer.decode(row, skip_special_tokens=False), ex).reward)
    model.train(was_training)
    return scores


def pretrain(
    out_dir: str | Path,
    cfg: PretrainConfig = PretrainConfig(),
    task_cfg: RecallTaskConfig | None = None,
    init_from: str | Path | None = None,
) -> dict:
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    task_cfg = task_cfg or RecallTaskConfig()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out_dir = Path(out_dir)
    make_tiny_qwen3(out_dir, RECALL_SHAPE, seed=cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)
    # init_from continues an earlier stage (same shape): a longer schedule split into reproducible runs.
    weights = str(init_from) if init_from else str(out_dir)
    model = Qwen3ForCausalLM.from_pretrained(weights, local_files_only=True, dtype=torch.float32)
    model.train()
    task = RecallTask(task_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    rng = random.Random(cfg.seed)
    t0 = time.time()
    steps_done = 0
    bar = tqdm(range(cfg.steps), desc="pretrain recall")
    for step in bar:
        if (time.time() - t0) / 60 > cfg.max_minutes or (cfg.stop_after and step >= cfg.stop_after):
            break
        length = _length_at(step, cfg, rng)
        ids, mask = _batch(task, tokenizer, step * cfg.batch_size, cfg.batch_size, length)
        logits = model(input_ids=ids).logits[:, :-1]
        targets = ids[:, 1:]
        loss_mask = mask[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[loss_mask], targets[loss_mask])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        steps_done = step + 1
        bar.set_postfix(loss=f"{loss.item():.3f}", length=length)
    train_minutes = (time.time() - t0) / 60
    rewards = greedy_rewards(model, tokenizer, task, cfg.eval_examples)
    accuracy = sum(rewards) / len(rewards)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    report = {
        "task": asdict(task_cfg),
        "pretrain": asdict(cfg),
        "steps_done": steps_done,
        "train_minutes": round(train_minutes, 2),
        "final_loss": round(loss.item(), 4),
        "dense_greedy_accuracy": round(accuracy, 4),
        "eval_examples": cfg.eval_examples,
        "eval_rewards": rewards,
        "init_from": str(init_from) if init_from else None,
        "torch": torch.__version__,
    }
    (out_dir / "recall_pretrain.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output checkpoint directory")
    parser.add_argument("--steps", type=int, default=PretrainConfig.steps)
    parser.add_argument("--max-minutes", type=float, default=PretrainConfig.max_minutes)
    parser.add_argument("--stop-after", type=int, default=0, help="stop after N steps of the schedule")
    parser.add_argument("--batch-size", type=int, default=PretrainConfig.batch_size)
    parser.add_argument("--max-len", type=int, default=PretrainConfig.max_len)
    parser.add_argument("--lr", type=float, default=PretrainConfig.lr)
    parser.add_argument("--eval-examples", type=int, default=PretrainConfig.eval_examples)
    parser.add_argument("--seed", type=int, default=PretrainConfig.seed)
    parser.add_argument("--num-queries", type=int, default=RecallTaskConfig.num_queries)
    parser.add_argument(
        "--init-from", help="continue from this checkpoint (an earlier stage) instead of random"
    )
    args = parser.parse_args(argv)
    cfg = PretrainConfig(
        steps=args.steps,
        max_minutes=args.max_minutes,
        stop_after=args.stop_after,
        batch_size=args.batch_size,
        max_len=args.max_len,
        lr=args.lr,
        eval_examples=args.eval_examples,
        seed=args.seed,
    )
    task_cfg = RecallTaskConfig(num_queries=args.num_queries)
    report = pretrain(args.out, cfg, task_cfg, init_from=args.init_from)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
