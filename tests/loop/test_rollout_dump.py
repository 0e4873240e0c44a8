"""loop.dump_rollouts: a step's samples written as JSON lines, read back exactly."""

import torch

from sparrow_megatron.loop.rollout_dump import rollout_rows
from sparrow_megatron.loop.rundir import RunDir
from sparrow_megatron.rollout.types import Sample


def _sample(prompt: int, j: int, n: int) -> Sample:
    lps = [-0.1 * (k + 1) / 3 for k in range(n)]  # not representable in binary: JSON must keep the bits
    return Sample(prompt, j, [1, 2, 3], list(range(10, 10 + n)), lps, [], [], "stop", 1, 4, "s256", None, 0.0)


def test_a_step_round_trips_exactly_and_a_redone_step_replaces_its_file(tmp_path):
    samples = [_sample(0, 0, 3), _sample(0, 1, 2)]
    dense = [torch.tensor([-0.25, -1 / 3, -2.0], dtype=torch.float32), torch.tensor([-0.5, -1e-8])]
    run = RunDir(tmp_path / "run").create()
    path = run.write_rollouts(2, rollout_rows(samples, [1.0, 0.0], [1.0, -0.25], dense))
    assert path == tmp_path / "run" / "rollouts" / "step_2.jsonl"
    first, second = run.read_rollouts(2)
    assert first["output_ids"] == [10, 11, 12] and first["prompt_len"] == 3
    assert first["engine_logprobs"] == samples[0].logprobs  # bit for bit through JSON
    assert first["trainer_logprobs"] == [float(x) for x in dense[0].double()]
    assert (second["prompt_index"], second["sample_index"]) == (0, 1)
    assert second["reward"] == 0.0 and second["shaped_reward"] == -0.25
    assert (first["schedule"], first["weight_version"], first["engine_id"]) == ("s256", 4, 1)
    # A resumed run redoing step 2 replaces the file a killed run left, whole.
    run.write_rollouts(2, rollout_rows(samples[:1], [0.5], [0.5], dense[:1]))
    assert [r["reward"] for r in run.read_rollouts(2)] == [0.5]
    assert not list(run.rollouts.glob("*.tmp"))
