"""Which KV budget schedule a request decodes under: a server-wide default and a per-request override.

- Server default: the environment variable SPARROW_SCHEDULE (a preset name, a schedule file path, or
  'dense'), read by every SGLang process at start-up. Unset = dense.
- Per request: `sampling_params.custom_params.sparrow_schedule` in /generate (SGLang carries
  custom_params unchanged to the scheduler). The value is a string: a preset name, 'dense', a schedule
  file path on the server, or an inline JSON schedule (`Schedule.to_dict()` as a JSON string, since
  custom_params values must be flat JSON). It replaces the server default for that request.

A request's schedule is checked when SGLang verifies its sampling params, so a bad one is answered with
HTTP 400 naming the problem and never reaches the model.
"""

from __future__ import annotations

import functools
import json
import os
from collections import OrderedDict

from sparrow_megatron.errors import UserError
from sparrow_megatron.sparsity.schedule import Schedule, resolve_schedule
from sparrow_megatron.sparsity.selection import DEFAULT_GEOMETRY

CUSTOM_PARAM_KEY = "sparrow_schedule"
DEFAULT_SCHEDULE_ENV = "SPARROW_SCHEDULE"
# Landmarks are kept per physical KV page, so schedules must use SGLang's page size (--page-size 16).
SERVER_PAGE_SIZE = DEFAULT_GEOMETRY.page_size


def parse_schedule(spec: object) -> Schedule | None:
    """A schedule spec string -> Schedule (None = dense). Raises UserError naming the problem."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(
            f"a schedule must be a non-empty string (preset, file, 'dense' or JSON), got {spec!r}"
        )
    return _parse_schedule(spec.strip())


@functools.lru_cache(maxsize=256)
def _parse_schedule(text: str) -> Schedule | None:
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"inline schedule is not valid JSON ({err.msg} at char {err.pos})") from None
        schedule = Schedule.from_dict(data, source="inline schedule")
    else:
        schedule = resolve_schedule(text)
    if schedule is not None and schedule.geometry.page_size != SERVER_PAGE_SIZE:
        raise UserError(
            f"schedule '{schedule.name}': page_size {schedule.geometry.page_size} differs from the "
            f"server's KV page size {SERVER_PAGE_SIZE}"
        )
    return schedule


def server_default_schedule() -> Schedule | None:
    spec = os.environ.get(DEFAULT_SCHEDULE_ENV, "").strip()
    if not spec:
        return None
    try:
        return parse_schedule(spec)
    except UserError as err:
        raise UserError(f"{DEFAULT_SCHEDULE_ENV}={spec!r}: {err}") from None


def request_schedule(custom_params: object) -> Schedule | None:
    """The schedule of one request from its sampling_params.custom_params (else the server default)."""
    if isinstance(custom_params, dict) and CUSTOM_PARAM_KEY in custom_params:
        return parse_schedule(custom_params[CUSTOM_PARAM_KEY])
    return server_default_schedule()


def validate_request(custom_params: object) -> None:
    """Raise ValueError (SGLang answers 400) when a request carries an invalid schedule."""
    if not (isinstance(custom_params, dict) and CUSTOM_PARAM_KEY in custom_params):
        return
    try:
        parse_schedule(custom_params[CUSTOM_PARAM_KEY])
    except (UserError, ValueError, TypeError) as err:
        raise ValueError(f"sampling_params.custom_params.{CUSTOM_PARAM_KEY}: {err}") from None


# Request id -> schedule of the requests the scheduler has batched, bounded (oldest dropped first).
_SCHEDULES_BY_RID: OrderedDict[str, Schedule | None] = OrderedDict()
_MAX_NOTED = 65536


# The schedules of the batch the scheduler built last, in batch order: a replayed CUDA graph's batch
# view has no request ids, and that batch is the one about to run (same thread, just before the forward).
_CURRENT_STEP: list[Schedule | None] = []


def note_request_schedules(reqs) -> None:
    """Called for every forward batch the scheduler builds, with its requests."""
    step = []
    for req in reqs:
        if req.rid in _SCHEDULES_BY_RID:
            _SCHEDULES_BY_RID.move_to_end(req.rid)
        else:
            _SCHEDULES_BY_RID[req.rid] = request_schedule(req.sampling_params.custom_params)
            if len(_SCHEDULES_BY_RID) > _MAX_NOTED:
                _SCHEDULES_BY_RID.popitem(last=False)
        step.append(_SCHEDULES_BY_RID[req.rid])
    _CURRENT_STEP[:] = step


def current_step_schedules() -> list[Schedule | None]:
    """The schedules of the last batch noted, in batch order."""
    return list(_CURRENT_STEP)


def schedules_of(rids) -> list[Schedule | None]:
    """The schedules of a forward batch's requests, in batch order."""
    if not rids:
        return []
    return [_SCHEDULES_BY_RID[rid] if rid in _SCHEDULES_BY_RID else server_default_schedule() for rid in rids]
