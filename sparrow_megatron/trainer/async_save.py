"""Asynchronous checkpoint saves (trainer.async_save) on Megatron-Core's AsyncCallsQueue.

`dist_checkpointing.save(..., async_sharded_save=True)` writes the small common state at once and
returns an AsyncRequest for the tensor shards; the queue runs it in a forked process (a fork per save,
Megatron's TemporalAsyncCaller). The fork is the snapshot: on GPU the shards are first copied to host
memory, on CPU the child's copy-on-write pages keep the values of the save step while training goes on
in the parent. The persistent (spawned) worker is not used: it would receive CPU tensors through shared
memory, i.e. the live parameters, not a snapshot.

A request's finalize functions (Megatron's metadata, then our manifest) run only once every rank's
write finished, inside `finalize`, which is collective: every rank calls it at the same point (the loop
drives it through spmd). Until then the checkpoint directory has no manifest and is refused on resume.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

from sparrow_megatron.errors import UserError


def unsupported_reason() -> str | None:
    """Why this installation cannot save asynchronously, or None."""
    try:
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue  # noqa: F401
    except ImportError as exc:
        return f"this megatron-core has no async checkpoint queue ({exc})"
    if "async_sharded_save" not in inspect.signature(dist_checkpointing.save).parameters:
        return "this megatron-core's dist_checkpointing.save has no async_sharded_save"
    return None


def strategy_kwargs() -> dict[str, str]:
    """Megatron-Core's own async writer: newer releases (0.19) default `dist_checkpointing.save` to
    NVIDIA Resiliency Extension's ("nvrx"), a package neither our image nor the CPU venv installs."""
    from megatron.core import dist_checkpointing

    if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters:
        return {"async_strategy": "mcore"}
    return {}


class AsyncSaves:
    """The saves in flight, oldest first; `finalize` completes those every rank has written."""

    def __init__(self) -> None:
        reason = unsupported_reason()
        if reason is not None:
            raise UserError(f"field 'trainer.async_save': {reason}; set trainer.async_save=false")
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.queue = AsyncCallsQueue(persistent=False)
        self.in_flight: list[Path] = []
        self.finished: list[Path] = []  # finalized, not yet reported by `take_finished`

    def schedule(self, request, ckpt_dir: Path, finalize_fn: Callable[[], None]) -> None:
        """Collective. Start writing `request` in the background; `finalize_fn` runs (on every rank, after
        Megatron's own finalization) once every rank's write is done."""
        request.add_finalize_fn(finalize_fn)
        self.queue.schedule_async_request(request)
        self.in_flight.append(ckpt_dir)

    def finalize(self, blocking: bool) -> None:
        """Collective. Finalize the saves every rank has written (blocking: all of them, waiting)."""
        if not self.in_flight:
            return
        done = self.queue.maybe_finalize_async_calls(blocking=blocking)
        self.finished += self.in_flight[: len(done)]
        del self.in_flight[: len(done)]

    def take_finished(self) -> list[str]:
        """The directories finalized since the last call, oldest first."""
        out, self.finished = [str(p) for p in self.finished], []
        return out
