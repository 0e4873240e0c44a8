import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparrow_megatron.sparsity.acceptance import acceptance_from_topk
from sparrow_megatron.sparsity.topk_file import TopKSequence


def _sequences(n_seq=6, tokens=400, vocab=50, k=20, seed=0):
    """Dense/sparse pairs whose disagreement grows with position, as sparse rollout's does."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(n_seq):
        logits = torch.randn(tokens, vocab, generator=g) * 3
        noise = torch.randn(tokens, vocab, generator=g) * torch.linspace(0.05, 2.0, tokens)[:, None]
        p, q = torch.log_softmax(logits, -1), torch.log_softmax(logits + noise, -1)
        (pl, pi), (ql, qi) = p.topk(k), q.topk(k)
        out.append(TopKSequence(100 * s, pi, pl.double(), qi, ql.double()))
    return out


@pytest.fixture
def topk_file(tmp_path):
    path = tmp_path / "tails.jsonl"
    seqs = _sequences()
    path.write_text("\n".join(s.to_json() for s in seqs) + "\n")
    return path, seqs


def test_tail_json_matches_the_library(sparrow, topk_file, tmp_path):
    path, seqs = topk_file
    code, out, err = sparrow(
        "tail",
        str(path),
        "--bin-width",
        "200",
        "--signal",
        "estimate",
        "--json",
        "--plot",
        str(tmp_path / "t.png"),
    )
    assert code == 0, err
    result = json.loads(out)
    assert set(result) >= {"bins", "pearson_p5", "pearson_mean", "signal"}
    assert set(result["bins"][0]) == {
        "start",
        "end",
        "count",
        "mean",
        "p5",
        "p5_lower",
        "p5_upper",
        "p5_estimate",
    }
    assert result["bins"][0]["p5_estimate"] == result["bins"][0]["p5"]
    assert sum(b["count"] for b in result["bins"]) == 6 * 400
    # first bin recomputed by hand from the same lists
    est = torch.cat(
        [
            acceptance_from_topk(s.dense_ids, s.dense_logprobs, s.sparse_ids, s.sparse_logprobs)[0][
                : max(0, 200 - s.prompt_len)
            ]
            for s in seqs
        ]
    )
    assert result["bins"][0]["count"] == est.numel()
    assert math.isclose(result["bins"][0]["p5"], torch.quantile(est, 0.05).item(), rel_tol=1e-9)
    assert result["pearson_p5"] < -0.5  # the tail decays with position
    assert all(b["p5_lower"] <= b["p5"] <= b["p5_upper"] for b in result["bins"])
    assert (tmp_path / "t.png").stat().st_size > 10_000


def _uncovered_vocab_file(tmp_path):
    """20 tokens whose top-2 lists leave most of the vocabulary out: p = {0: 0.5, 1: 0.3} and
    q = {0: b, 2: 0.2} with b = 0.10, 0.12, ..., 0.48 (token t: b = 0.1 + 0.02 t)."""
    rows = []
    for t in range(20):
        b = 0.1 + 0.02 * t
        rows.append(((0, 1), (math.log(0.5), math.log(0.3)), (0, 2), (math.log(b), math.log(0.2))))
    line = {
        "prompt_len": 0,
        "dense": {"ids": [list(r[0]) for r in rows], "logprobs": [list(r[1]) for r in rows]},
        "sparse": {"ids": [list(r[2]) for r in rows], "logprobs": [list(r[3]) for r in rows]},
    }
    path = tmp_path / "uncovered.jsonl"
    path.write_text(json.dumps(line) + "\n")
    return path


def test_tail_reports_the_lower_bound_p5_by_default(sparrow, tmp_path):
    # Hand-computed per token t (b = 0.1 + 0.02 t; only id 0 is in both lists):
    #   lower    = min(0.5, b) = b
    #   estimate = b + min(0.3, q's floor min(b, 0.2)) + min(0.2, p's floor 0.3) = 2b + 0.2 for b <= 0.2,
    #              capped by upper = b + min(1 - 0.5, 1 - b) = b + 0.5
    # p5 of 20 values interpolates at rank 0.95 between the two smallest (t = 0 and t = 1).
    path = _uncovered_vocab_file(tmp_path)
    code, out, err = sparrow("tail", str(path), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["signal"] == "lower"
    (b,) = result["bins"]
    assert b["count"] == 20
    assert b["p5"] == pytest.approx(0.10 + 0.95 * 0.02, abs=1e-12)
    assert b["p5_lower"] == pytest.approx(0.10 + 0.95 * 0.02, abs=1e-12)
    assert b["p5_estimate"] == pytest.approx(0.40 + 0.95 * 0.04, abs=1e-12)
    assert b["p5_upper"] == pytest.approx(0.60 + 0.95 * 0.02, abs=1e-12)
    assert b["mean"] == pytest.approx(0.1 + 0.02 * 9.5, abs=1e-12)  # mean of the chosen signal

    code, out, _ = sparrow("tail", str(path), "--json", "--signal", "estimate")
    assert json.loads(out)["bins"][0]["p5"] == pytest.approx(0.40 + 0.95 * 0.04, abs=1e-12)
    code, out, _ = sparrow("tail", str(path), "--json", "--signal", "upper")
    assert json.loads(out)["bins"][0]["p5"] == pytest.approx(0.60 + 0.95 * 0.02, abs=1e-12)

    code, out, _ = sparrow("tail", str(path))
    assert code == 0 and "p5 lower*" in out and "0.119" in out and "0.438" in out and "0.619" in out


def test_tail_table_output(sparrow, topk_file):
    code, out, _ = sparrow("tail", str(topk_file[0]))
    assert code == 0 and "Pearson r vs position" in out and "0-2000" in out


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "no sequences"),
        ("{not json\n", "tails.jsonl:1: not valid JSON"),
        ('{"dense": {}, "sparse": {}}\n', "tails.jsonl:1: field 'prompt_len'"),
        ('{"prompt_len": 1, "dense": {"ids": [[1]], "logprobs": [[-0.1]]}}\n', "field 'sparse'"),
        (
            '{"prompt_len": 1, "dense": {"ids": [[1]], "logprobs": [[-0.1]]}, "sparse": {"ids": [[1], [2]], '
            '"logprobs": [[-0.1], [-0.2]]}}\n',
            "dense has 1 tokens, sparse has 2",
        ),
        (
            '{"prompt_len": 1, "dense": {"ids": [[1, 2]], "logprobs": [[-0.1]]}, "sparse": {"ids": [[1]], '
            '"logprobs": [[-0.1]]}}\n',
            "field 'dense.ids[0]'",
        ),
        (
            '{"prompt_len": 1, "dense": {"ids": [["a"]], "logprobs": [[-0.1]]}, "sparse": {"ids": [[1]], '
            '"logprobs": [[-0.1]]}}\n',
            "ids must be integers",
        ),
        (
            '{"prompt_len": 1, "dense": {"ids": [[1]], "logprobs": [[0.5]]}, "sparse": {"ids": [[1]], '
            '"logprobs": [[-0.1]]}}\n',
            "must be <= 0",
        ),
    ],
)
def test_tail_bad_input_is_exit_2_naming_the_line(sparrow, tmp_path, content, message):
    path = tmp_path / "tails.jsonl"
    path.write_text(content)
    code, out, err = sparrow("tail", str(path))
    assert code == 2 and message in err and "Traceback" not in err


def test_tail_missing_file_and_bad_width(sparrow, tmp_path, topk_file):
    code, _, err = sparrow("tail", str(tmp_path / "nope.jsonl"))
    assert code == 2 and "cannot read" in err
    code, _, err = sparrow("tail", str(topk_file[0]), "--bin-width", "0")
    assert code == 2 and "--bin-width" in err


def test_nan_logprobs_count_as_absent(sparrow, tmp_path):
    path = tmp_path / "nan.jsonl"
    row = {
        "prompt_len": 3,
        "dense": {"ids": [[1, 2]], "logprobs": [[-0.1, float("nan")]]},
        "sparse": {"ids": [[1, 2]], "logprobs": [[-0.1, -3.0]]},
    }
    path.write_text(json.dumps(row) + "\n")
    code, out, err = sparrow("tail", str(path), "--json")
    assert code == 0, err
    assert json.loads(out)["bins"][0]["count"] == 1


def test_console_script_runs_as_a_subprocess(topk_file):
    exe = Path(sys.executable).parent / "sparrow"
    result = subprocess.run(
        [str(exe), "tail", str(topk_file[0]), "--json"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["bins"]
    bad = subprocess.run(
        [str(exe), "tail", "/nonexistent.jsonl"], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
