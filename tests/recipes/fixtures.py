"""What a new user brings, in miniature: a Qwen3 HF checkpoint and dataset files in the public formats.

The checkpoint has random weights and its own byte-level BPE tokenizer (trained here with `tokenizers`)
carrying Qwen's chat special tokens and a ChatML template, the way a downloaded Qwen3 dir does; it is
not the embedded recall model (whose character tokenizer the loaders never see from users).
"""

from __future__ import annotations

import json
from pathlib import Path

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Qwen3's template, reduced to what the loaders use: ChatML turns and the assistant header.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB = 384  # tokenizer target; the embedding is this size (a real Qwen3 pads its embedding too)

MATH = [
    ("What is 2 + 3?", "5"),
    ("What is 7 * 6?", "42"),
    ("Compute 10 - 4.", "6"),
    ("What is 9 + 9?", "18"),
    ("Find x if x + 1 = 3.", "2"),
    ("What is 12 / 4?", "3"),
]
# A reference solution and a wrong one for each code problem: the sandbox must tell them apart.
CODE = [
    ("Read two integers a and b on one line and print a + b.", [["1 2\n", "3\n"], ["5 7\n", "12\n"]]),
    ("Read an integer n and print n * 2.", [["3\n", "6\n"], ["10\n", "20\n"]]),
    ("Read a word and print it reversed.", [["abc\n", "cba\n"], ["xy\n", "yx\n"]]),
    ("Read an integer n and print n squared.", [["4\n", "16\n"], ["0\n", "0\n"]]),
]


def build_tokenizer(out_dir: Path):
    """A byte-level BPE tokenizer trained on a few lines of math and code text, saved to out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = [p for p, _ in MATH] + [p for p, _ in CODE] + ["Please reason step by step \\boxed{42}"] * 4
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 8,
        special_tokens=QWEN_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=QWEN_SPECIALS[1:],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def make_user_qwen3(out_dir: Path, seed: int = 0) -> Path:
    """A random-weight Qwen3 (config.json with model_type qwen3, safetensors) with the tokenizer above."""
    import torch
    from transformers import Qwen3ForCausalLM

    from sparrow_megatron.models.tiny import TinyQwen3Shape, qwen3_config

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir)
    shape = TinyQwen3Shape(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=4096)
    assert len(tokenizer) <= VOCAB, len(tokenizer)
    config = qwen3_config(shape, tokenizer.eos_token_id, tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_dapo_parquet(path: Path) -> Path:
    """DAPO-Math-17k: `prompt` as chat messages, the answer in `reward_model.ground_truth`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {
            "data_source": "math_dapo",
            "prompt": [
                {
                    "role": "user",
                    "content": f'Solve: {p}\n\nRemember to put your answer on its own line after "Answer:".',
                }
            ],
            "ability": "MATH",
            "reward_model": {"ground_truth": a, "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": f"dapo-{i}"},
        }
        for i, (p, a) in enumerate(MATH)
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_polaris_jsonl(path: Path) -> Path:
    """Polaris / DeepScaleR: `problem`, `answer` (plus `solution` in DeepScaleR)."""
    return _jsonl(path, [{"problem": p, "answer": a, "solution": f"\\boxed{{{a}}}"} for p, a in MATH])


def write_aime_jsonl(path: Path) -> Path:
    """AIME / MATH500 evaluation files: capitalised `Problem` / `Answer`, numeric answers."""
    return _jsonl(
        path, [{"ID": f"2024-I-{i}", "Problem": p, "Answer": int(a)} for i, (p, a) in enumerate(MATH)]
    )


def write_taco_jsonl(path: Path) -> Path:
    """TACO / APPS: `question`, `input_output` as a JSON string of {"inputs": [...], "outputs": [...]}."""
    rows = []
    for i, (q, cases) in enumerate(CODE):
        io = {"inputs": [c[0] for c in cases], "outputs": [c[1] for c in cases]}
        rows.append({"question": q, "input_output": json.dumps(io), "difficulty": "EASY", "problem_id": i})
    return _jsonl(path, rows)


def write_livecodebench_jsonl(path: Path) -> Path:
    """LiveCodeBench: `question_content`, `public_test_cases` as a JSON string of {input, output, testtype}."""
    rows = []
    for i, (q, cases) in enumerate(CODE):
        tests = [{"input": c[0], "output": c[1], "testtype": "stdin"} for c in cases]
        rows.append(
            {
                "question_id": f"lcb-{i}",
                "question_title": f"p{i}",
                "question_content": q,
                "public_test_cases": json.dumps(tests),
                "difficulty": "easy",
            }
        )
    return _jsonl(path, rows)
