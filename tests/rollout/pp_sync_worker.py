"""Run under torchrun by tests/rollout/test_dist_sync_pp.py: a PP trainer syncs its weights to attached
SGLang engines over rollout.weight_sync=distributed, one sender per pipeline stage.

Rank 0 attaches to the engines, pushes the policy's weights twice (the second reuses the groups), then
generates greedily; it writes the sync metrics, the group builds and the tokens to --out/result.json.
The other ranks replay rank 0's calls (sparrow_megatron/loop/spmd.py), as in the loop.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class _KillingPolicy:
    """Rank 0's policy handle that kills an engine after stage 0's first bucket of the first try."""

    def __init__(self, driven, pid: int):
        self.driven, self.pid, self.tries = driven, pid, 0

    def iter_hf_weights(self, **kwargs):
        self.tries += 1
        buckets = self.driven.iter_hf_weights(**kwargs)  # the followers start their part now
        return self._killing(buckets) if self.tries == 1 else buckets

    def _killing(self, buckets):
        import signal

        for k, bucket in enumerate(buckets):
            if k == 1:
                os.killpg(self.pid, signal.SIGKILL)
                time.sleep(1.0)  # gone before the next request reaches it
            yield bucket


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--urls", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--bucket-bytes", type=int, default=40_000)
    args = ap.parse_args()

    from sparrow_megatron.loop.spmd import DrivenPolicy, follow
    from tests.trainer.policy_args import make_policy

    policy = make_policy(args.model_dir, pp=args.pp)
    import torch

    if torch.distributed.get_rank() != 0:
        follow({"policy": policy})
        torch.distributed.destroy_process_group()
        return

    from sparrow_megatron.loop.weight_sync import WeightSync
    from sparrow_megatron.rollout import FleetOptions, RolloutConfig, RolloutFleet, SamplingParams

    out = Path(args.out)
    fleet = RolloutFleet(
        RolloutConfig(urls=args.urls.split(","), timeout_s=120), FleetOptions(health_interval_s=0)
    ).start()
    driven = DrivenPolicy(policy)
    try:
        sync = WeightSync("distributed", fleet, out, stages=args.pp)
        sync.bucket_bytes = args.bucket_bytes  # several buckets per stage
        pushes = [sync.push(driven), sync.push(driven)]
        greedy = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
        prompts = json.loads(os.environ["PP_SYNC_PROMPTS"])
        batch = fleet.generate(prompts, greedy, n=2)
        result = {
            "pushes": pushes,
            "builds": fleet._dist.builds,
            "version": fleet.weight_version,
            "samples": [[s.prompt_index, s.engine_id, s.weight_version, s.output_ids] for s in batch.flat()],
        }
        if os.environ.get("PP_SYNC_KILL_PID"):  # an engine lost in the middle of the next sync
            start = time.monotonic()
            pushes.append(sync.push(_KillingPolicy(driven, int(os.environ["PP_SYNC_KILL_PID"]))))
            result["kill_sync_s"] = time.monotonic() - start  # for reading, not asserted
            batch = fleet.generate(prompts, greedy, n=2)
            result["after_kill"] = {
                "builds": fleet._dist.builds,
                "version": fleet.weight_version,
                "samples": [
                    [s.prompt_index, s.engine_id, s.weight_version, s.output_ids] for s in batch.flat()
                ],
            }
        (out / "result.json").write_text(json.dumps(result))
    finally:
        driven.stop()
        fleet.shutdown()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
