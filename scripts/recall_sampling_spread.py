#!/usr/bin/env python
"""Does a recall checkpoint give GRPO a signal? Fraction of eval prompts whose samples disagree.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python scripts/recall_sampling_spread.py \
        sparrow_megatron/assets/tiny_recall 64

Samples 8 dense responses per prompt at temperature 1 (seeded; HF generate) on the first N eval prompts
of the task (haystack 1100) and prints the fraction of prompts whose 8 rewards are not all equal (a
group with equal rewards has zero GRPO advantage) and the mean sampled reward.
"""

import json
import sys

import torch
from transformers import AutoTokenizer, Qwen3ForCausalLM

from sparrow_megatron.data.recall import EVAL, RecallTask, recall_reward

SAMPLES = 8


def main() -> int:
    path, count = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 64
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = Qwen3ForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    examples = RecallTask().examples(EVAL, count)
    torch.manual_seed(0)
    mixed, means = 0, []
    with torch.no_grad():
        for b in range(0, count, 4):
            chunk = examples[b : b + 4]
            ids = torch.tensor(
                [tok(e.prompt_text(tok), add_special_tokens=False)["input_ids"] for e in chunk]
            )
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=len(chunk[0].answer) + 1,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                num_return_sequences=SAMPLES,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
            rows = out[:, ids.shape[1] :].view(len(chunk), SAMPLES, -1)
            for example, group in zip(chunk, rows, strict=True):
                rewards = [
                    recall_reward(tok.decode(r, skip_special_tokens=False), example).reward for r in group
                ]
                mixed += len(set(rewards)) > 1
                means.append(sum(rewards) / SAMPLES)
    report = {
        "prompts": count,
        "samples": SAMPLES,
        "temperature": 1.0,
        "frac_prompts_mixed_rewards": round(mixed / count, 4),
        "mean_sampled_reward": round(sum(means) / count, 4),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
