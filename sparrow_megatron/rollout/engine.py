"""HTTP client of one SGLang engine: generate with top-K log-probs, weight and adapter endpoints, health.

Errors split in two: `EngineFailure` (the engine could not answer: connection refused, timeout, 5xx,
an aborted or malformed answer) is retried on another engine by the fleet; `RequestRejected` (a 4xx,
e.g. an invalid schedule) is the caller's mistake and is raised at once.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx

from sparrow_megatron.errors import UserError
from sparrow_megatron.rollout.server import ServerProcess
from sparrow_megatron.rollout.types import Sample, SamplingParams
from sparrow_megatron.sparsity.schedule import Schedule

# The per-request schedule (sglang_patches/schedules.py): `sampling_params.custom_params.sparrow_schedule`,
# a string: a preset name, "dense", a schedule file on the server, or an inline JSON schedule.
SCHEDULE_PARAM = "sparrow_schedule"
DENSE = "dense"


class EngineFailure(RuntimeError):
    """The engine did not produce a usable answer; another engine may."""


class RequestRejected(UserError):
    """The engine refused the request itself (HTTP 4xx): retrying elsewhere would fail the same way."""


def schedule_spec(schedule: str | Schedule | None) -> str:
    """What a request carries for its schedule: "dense", a preset/file name, or a Schedule as JSON.

    Dense is sent explicitly: a server started with a default schedule (SPARROW_SCHEDULE) would
    otherwise decode a "dense" request sparsely."""
    if schedule is None or schedule == DENSE:
        return DENSE
    if isinstance(schedule, Schedule):
        return json.dumps(schedule.to_dict(), sort_keys=True, separators=(",", ":"))
    return str(schedule)


def schedule_label(schedule: str | Schedule | None) -> str | None:
    if schedule is None or schedule == "dense":
        return None
    return schedule.name if isinstance(schedule, Schedule) else str(schedule)


def generate_payload(
    prompt_ids: list[int],
    sampling: SamplingParams,
    top_logprobs: int,
    schedule: str | Schedule | None = None,
    adapter: str | None = None,
    rid: str | None = None,
) -> dict[str, Any]:
    params = sampling.to_sglang()
    spec = schedule_spec(schedule)
    payload: dict[str, Any] = {
        "input_ids": list(prompt_ids),
        "sampling_params": params,
        "return_logprob": True,
        "top_logprobs_num": top_logprobs,
        "logprob_start_len": -1,
    }
    params["custom_params"] = {SCHEDULE_PARAM: spec}
    if spec != DENSE:
        # Past the first sparse layer the KV a sparse decode writes differs from dense KV: a radix-cache
        # namespace per schedule keeps dense requests (and other schedules) from reusing it.
        payload["extra_key"] = "sparrow:" + spec
    if adapter is not None:
        payload["lora_path"] = adapter
    if rid is not None:
        payload["rid"] = rid
    return payload


@dataclass
class ParsedOutput:
    output_ids: list[int]
    logprobs: list[float]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]
    finish_reason: str
    matched_stop: Any
    weight_version: int | None


def parse_weight_version(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def parse_generate_response(body: Any, url: str) -> ParsedOutput:
    """Check and unpack one /generate answer; anything unusable is an EngineFailure naming the field."""
    if not isinstance(body, dict) or not isinstance(body.get("meta_info"), dict):
        raise EngineFailure(f"{url}/generate: answer without 'meta_info': {str(body)[:200]}")
    meta = body["meta_info"]
    finish = meta.get("finish_reason") or {}
    reason = finish.get("type") if isinstance(finish, dict) else str(finish)
    if reason == "abort":
        raise EngineFailure(f"{url}/generate: request aborted by the engine: {finish.get('message', finish)}")
    token_lps = meta.get("output_token_logprobs")
    top = meta.get("output_top_logprobs")
    output_ids = body.get("output_ids")
    if token_lps is None or top is None or output_ids is None:
        raise EngineFailure(
            f"{url}/generate: answer lacks output_ids/output_token_logprobs/output_top_logprobs"
        )
    if not (len(output_ids) == len(token_lps) == len(top)):
        raise EngineFailure(
            f"{url}/generate: {len(output_ids)} output ids, {len(token_lps)} log-probs, {len(top)} top-K rows"
        )
    logprobs = []
    for t, (entry, tok) in enumerate(zip(token_lps, output_ids, strict=True)):
        lp, tid = entry[0], entry[1]
        if tid != tok:
            raise EngineFailure(
                f"{url}/generate: output_token_logprobs[{t}] is for id {tid}, output id is {tok}"
            )
        if lp is None or not math.isfinite(lp):
            raise EngineFailure(f"{url}/generate: output_token_logprobs[{t}] = {lp} (not a finite log-prob)")
        logprobs.append(float(lp))
    top_ids, top_lps = [], []
    for row in top:
        row = row or []
        top_ids.append([int(e[1]) for e in row])
        # -inf is legal here (a token of probability 0 after top-p); NaN is not.
        lps = [float(e[0]) if e[0] is not None else float("-inf") for e in row]
        if any(math.isnan(x) for x in lps):
            raise EngineFailure(f"{url}/generate: NaN in output_top_logprobs")
        top_lps.append(lps)
    return ParsedOutput(
        output_ids=[int(x) for x in output_ids],
        logprobs=logprobs,
        top_ids=top_ids,
        top_logprobs=top_lps,
        finish_reason=str(reason),
        matched_stop=finish.get("matched") if isinstance(finish, dict) else None,
        weight_version=parse_weight_version(meta.get("weight_version")),
    )


def parse_score_response(body: Any, url: str, response_len: int) -> ParsedOutput:
    """Unpack the input log-probs of a teacher-forced request started at the last prompt token: SGLang
    returns one entry per token from there, the first (that prompt token) without a log-prob."""
    if not isinstance(body, dict) or not isinstance(body.get("meta_info"), dict):
        raise EngineFailure(f"{url}/generate: answer without 'meta_info': {str(body)[:200]}")
    meta = body["meta_info"]
    token_lps = meta.get("input_token_logprobs")
    top = meta.get("input_top_logprobs")
    if token_lps is None or top is None or len(token_lps) != response_len + 1 or len(top) != response_len + 1:
        n = None if token_lps is None else len(token_lps)
        raise EngineFailure(f"{url}/generate: expected {response_len + 1} input log-prob entries, got {n}")
    body = {
        "output_ids": [e[1] for e in token_lps[1:]],
        "meta_info": {"output_token_logprobs": token_lps[1:], "output_top_logprobs": top[1:],
                      "finish_reason": {"type": "score"}, "weight_version": meta.get("weight_version")},
    }  # fmt: skip
    return parse_generate_response(body, url)


class Engine:
    """One SGLang server, launched by us (`server` set) or attached by URL."""

    def __init__(
        self, engine_id: int, url: str, server: ServerProcess | None = None, timeout_s: float = 600.0
    ):
        self.engine_id = engine_id
        self.url = url.rstrip("/")
        self.server = server
        self.timeout_s = timeout_s
        self.client = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=10.0))
        self.inflight = 0
        self.healthy = True
        self.strikes = 0  # consecutive failed health probes
        self.weight_version = 0
        self.lock = threading.Lock()  # guards inflight / healthy / restarts

    def __repr__(self) -> str:
        return f"Engine({self.engine_id}, {self.url}, healthy={self.healthy})"

    @property
    def launched(self) -> bool:
        return self.server is not None

    def process_alive(self) -> bool:
        return self.server is None or self.server.alive()

    def check_health(self, timeout_s: float = 10.0) -> bool:
        if not self.process_alive():
            return False
        try:
            return self.client.get(f"{self.url}/health", timeout=timeout_s).status_code == 200
        except httpx.HTTPError:
            return False

    def drain(self, timeout_s: float) -> None:
        """Wait until the engine runs no request, then flush its prefix cache (SGLang's deferred
        /flush_cache). Requests a client gave up on (timeouts, aborts) stop only when the scheduler gets to
        them; a weight update that comes first is refused ("cache not flushed: requests running")."""
        url = f"{self.url}/flush_cache"
        try:
            resp = self.client.post(url, params={"timeout": timeout_s}, timeout=timeout_s + 10.0)
        except httpx.HTTPError as err:
            raise EngineFailure(f"{url}: {err!r}") from err
        if resp.status_code != 200:
            raise EngineFailure(f"{url}: still running requests after {timeout_s:g} s: {resp.text[:200]}")

    # --- requests -------------------------------------------------------------------------------

    def post(self, endpoint: str, payload: dict[str, Any], timeout_s: float | None = None) -> Any:
        """POST JSON; EngineFailure on transport errors and 5xx, RequestRejected on 4xx."""
        url = f"{self.url}/{endpoint}"
        try:
            resp = self.client.post(url, json=payload, timeout=timeout_s or self.timeout_s)
        except httpx.TimeoutException as err:
            raise EngineFailure(
                f"{url}: timed out after {timeout_s or self.timeout_s:.0f} s ({err!r})"
            ) from err
        except httpx.HTTPError as err:
            raise EngineFailure(f"{url}: {err!r}") from err
        if resp.status_code >= 500:
            raise EngineFailure(f"{url}: HTTP {resp.status_code}: {resp.text[:500]}")
        if resp.status_code >= 400:
            raise RequestRejected(f"{url}: HTTP {resp.status_code}: {resp.text[:500]}")
        try:
            return resp.json()
        except ValueError as err:
            raise EngineFailure(f"{url}: answer is not JSON: {resp.text[:200]}") from err

    def control(
        self, endpoint: str, payload: dict[str, Any] | None = None, timeout_s: float | None = None
    ) -> Any:
        """POST to a control endpoint; `success: false` in the answer raises EngineFailure."""
        body = self.post(endpoint, payload or {}, timeout_s)
        if isinstance(body, dict) and body.get("success") is False:
            raise EngineFailure(f"{self.url}/{endpoint}: {body.get('message') or body.get('error_message')}")
        return body

    def generate(
        self,
        prompt_ids: list[int],
        sampling: SamplingParams,
        top_logprobs: int,
        schedule: str | Schedule | None = None,
        adapter: str | None = None,
        rid: str | None = None,
    ) -> tuple[ParsedOutput, float]:
        payload = generate_payload(prompt_ids, sampling, top_logprobs, schedule, adapter, rid)
        start = time.perf_counter()
        body = self.post("generate", payload)
        return parse_generate_response(body, self.url), time.perf_counter() - start

    def score(
        self,
        prompt_ids: list[int],
        output_ids: list[int],
        top_logprobs: int,
        schedule: str | Schedule | None = None,
        adapter: str | None = None,
    ) -> ParsedOutput:
        """Log-probs and top-K of output_ids given the prompt, in one prefill (no generation)."""
        payload = generate_payload(
            list(prompt_ids) + list(output_ids),
            SamplingParams(max_new_tokens=0),
            top_logprobs,
            schedule,
            adapter,
        )
        payload["logprob_start_len"] = len(prompt_ids) - 1
        parsed = parse_score_response(self.post("generate", payload), self.url, len(output_ids))
        if parsed.output_ids != [int(x) for x in output_ids]:
            raise EngineFailure(f"{self.url}/generate: scored ids differ from the given response ids")
        return parsed

    def to_sample(self, parsed: ParsedOutput, latency_s: float, prompt_ids: list[int], prompt_index: int,
                  sample_index: int, schedule, adapter: str | None, attempts: int) -> Sample:  # fmt: skip
        return Sample(
            prompt_index=prompt_index,
            sample_index=sample_index,
            prompt_ids=list(prompt_ids),
            output_ids=parsed.output_ids,
            logprobs=parsed.logprobs,
            top_ids=parsed.top_ids,
            top_logprobs=parsed.top_logprobs,
            finish_reason=parsed.finish_reason,
            engine_id=self.engine_id,
            weight_version=parsed.weight_version
            if parsed.weight_version is not None
            else self.weight_version,
            schedule=schedule_label(schedule),
            adapter=adapter,
            latency_s=latency_s,
            attempts=attempts,
            matched_stop=parsed.matched_stop,
        )

    def close(self) -> None:
        self.client.close()
