"""The rollout fleet the RL loop talks to: launch/attach, route, generate, sync weights and adapters.

Routing is in this client (least in-flight first, round-robin on ties) rather than behind
sglang-router: the loop needs the engine and weight version of every sample, retries that avoid the
engine that failed, and restarts of engines it launched, which a single router URL would hide.
"""

from __future__ import annotations

import itertools
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from sparrow_megatron.errors import UserError
from sparrow_megatron.rollout.config import FleetOptions, RolloutConfig
from sparrow_megatron.rollout.engine import (
    Engine,
    EngineFailure,
    RequestRejected,
    parse_weight_version,
    schedule_label,
)
from sparrow_megatron.rollout.server import (
    EngineStartError,
    ServerProcess,
    cuda_available,
    free_port,
    port_is_free,
    resolve_device,
)
from sparrow_megatron.rollout.types import EngineStats, GenerationResult, Sample, SamplingParams, ScoredTokens
from sparrow_megatron.rollout.weights import Bucket, DistributedGroupSpec, tensor_update_payload
from sparrow_megatron.sparsity.schedule import Schedule

logger = logging.getLogger(__name__)

# `adapter=` default of generate: use the fleet's active adapter on the sparse path.
ACTIVE = "active"
# How long a weight update waits for an engine to finish the requests its clients dropped: they stop at
# the scheduler's next step, seconds even for long contexts; longer means the engine is stuck.
DRAIN_TIMEOUT_S = 120.0
RESTART_ATTEMPTS = 3  # a restarted server that exits while starting (its port taken meanwhile) tries again


class RolloutError(RuntimeError):
    """Requests that failed on every engine they were tried on; the message lists each reason."""


class NoEngineAvailable(EngineFailure):
    pass


class RolloutFleet:
    """N SGLang engines behind one client. Use as a context manager, or call start() / shutdown()."""

    def __init__(self, rollout: RolloutConfig, options: FleetOptions):
        problems = rollout.problems() + options.problems(launching=not rollout.urls)
        if problems:
            raise UserError("invalid rollout fleet:\n  " + "\n  ".join(problems))
        self.rollout = rollout
        self.options = options
        self.engines: list[Engine] = []
        self.weight_version = 0
        self.active_adapter: str | None = None
        self.adapters: dict[str, str] = {}  # loaded name -> path, reloaded on restarted engines
        self._adapter_counter = itertools.count(1)
        self._run_dir = (
            Path(options.run_dir) if options.run_dir else Path(tempfile.mkdtemp(prefix="sparrow-fleet-"))
        )
        # What a restarted engine loads: the base model until a disk sync names a newer checkpoint.
        self._restart_model_path = options.model_path
        self._restart_version = 0
        self._cond = threading.Condition()
        self._rr = itertools.count()
        self._restarting: set[int] = set()
        self._restart_threads: list[threading.Thread] = []
        self._restart_log: list[tuple[int, float, str]] = []  # (engine_id, time, reason)
        self._update_lock = threading.Lock()  # weight/adapter changes vs generation
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        self._dist = None  # DistributedSync once init_distributed_sync ran
        # Bytes the last weight sync moved: the payload sent to each engine (http), the snapshot
        # written once (disk), or the bytes broadcast once to the group (distributed).
        self.last_sync_bytes = 0
        self.last_sync_stage_bytes: list[int] = []  # per pipeline stage, distributed sync under PP

    # --- lifecycle --------------------------------------------------------------------------------

    @property
    def run_dir(self) -> Path:
        return self._run_dir

    @property
    def urls(self) -> list[str]:
        return [e.url for e in self.engines]

    def start(self) -> RolloutFleet:
        try:
            if self.rollout.urls:
                for i, url in enumerate(self.rollout.urls):
                    self.engines.append(Engine(i, url, timeout_s=self.rollout.timeout_s))
                dead = [e.url for e in self.engines if not e.check_health()]
                if dead:
                    raise EngineFailure(f"rollout: engines not healthy at attach: {', '.join(dead)}")
            else:
                self._launch_all()
        except BaseException:
            self.shutdown()
            raise
        if self.options.health_interval_s > 0:
            self._monitor = threading.Thread(target=self._monitor_loop, name="fleet-monitor", daemon=True)
            self._monitor.start()
        return self

    def _launch_all(self) -> None:
        taken: set[int] = set()
        servers = []
        for i in range(self.rollout.engines):
            port = self._pick_port(i, taken)
            taken.add(port)
            server = ServerProcess.launch(
                self.rollout, self._engine_options(i), port, self._log_path(i), self._restart_model_path
            )
            servers.append(server)
            self.engines.append(Engine(i, server.url, server, timeout_s=self.rollout.timeout_s))
            logger.info("engine %d: pid %d, %s, log %s", i, server.pid, server.url, server.log_path)
        # Start-up runs in parallel. A server that dies while starting gets one more try (start-up on a
        # shared machine can fail on transient memory pressure); a second failure raises with its log tail.
        for engine in self.engines:
            try:
                engine.server.wait_healthy(self.options.startup_timeout_s)
            except EngineStartError as err:
                if engine.server.alive():
                    raise  # timed out: retrying would only double the wait
                logger.warning("engine %d failed to start, retrying once: %s", engine.engine_id, err)
                engine.server.kill(grace_s=2.0)
                server = ServerProcess.launch(
                    self.rollout, self._engine_options(engine.engine_id), engine.server.port, self._log_path(engine.engine_id),
                    self._restart_model_path,
                )  # fmt: skip
                engine.server, engine.url = server, server.url
                server.wait_healthy(self.options.startup_timeout_s)

    def _engine_options(self, engine_id: int, version: int = 0) -> FleetOptions:
        opts = self.options
        extra = [*opts.extra_server_args, "--weight-version", str(version)]
        if resolve_device(opts) == "cuda":
            # Engines of one node take disjoint GPUs: engine i serves on GPUs [i * tp, (i + 1) * tp).
            extra += ["--base-gpu-id", str(engine_id * self.rollout.engine_tp)]
        return replace(opts, extra_server_args=extra)

    def _pick_port(self, i: int, taken: set[int]) -> int:
        start = None if self.options.port_base is None else self.options.port_base + i
        return free_port(self.options.host, start, taken)

    def _log_path(self, i: int) -> Path:
        return self._run_dir / f"engine{i}.log"

    def __enter__(self) -> RolloutFleet:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for t in list(self._restart_threads):
            t.join(timeout=self.options.startup_timeout_s + 30)
        for engine in self.engines:
            if engine.server is not None:
                engine.server.kill()
            engine.close()
        if self._monitor is not None:
            self._monitor.join(timeout=self.options.health_interval_s + 15)

    # --- health, restarts -------------------------------------------------------------------------

    def _monitor_loop(self) -> None:
        while not self._stop.wait(self.options.health_interval_s):
            try:
                self.check_engines()
            except Exception:  # the monitor must not die; the next round tries again
                logger.exception("fleet monitor")

    def check_engines(self) -> list[int]:
        """Probe every engine: mark the dead, restart those we launched, revive attached ones that answer.
        Returns the ids found dead this round."""
        dead = []
        for engine in self.engines:
            if engine.engine_id in self._restarting:
                continue
            if not self._probe(engine, "periodic health check"):
                dead.append(engine.engine_id)
        return dead

    def _probe(self, engine: Engine, context: str) -> bool:
        """Is the engine alive? An exited process is dead at once; a live one after `health_strikes`
        consecutive failed /health probes. A dead one is marked (and restarted if we launched it)."""
        if not engine.process_alive():
            self._mark_dead(
                engine, f"process exited with code {engine.server.process.returncode} ({context})"
            )
            return False
        if engine.check_health():
            engine.strikes = 0
            if not engine.healthy and engine.engine_id not in self._restarting:
                self._readmit(engine)  # an attached engine that answers again
            return engine.healthy
        engine.strikes += 1
        if engine.strikes >= self.options.health_strikes or not engine.healthy:
            self._mark_dead(engine, f"{engine.strikes} failed health checks ({context})")
            return False
        return True

    def _mark_dead(self, engine: Engine, reason: str) -> None:
        with self._cond:
            was_healthy = engine.healthy
            engine.healthy = False
            if engine.engine_id in self._restarting or self._stop.is_set():
                return
            if engine.launched and self.options.restart_dead:
                self._restarting.add(engine.engine_id)
                t = threading.Thread(target=self._restart, args=(engine, reason), daemon=True,
                                     name=f"restart-engine{engine.engine_id}")  # fmt: skip
                self._restart_threads.append(t)
                t.start()
        if was_healthy:
            logger.warning("engine %d (%s) is dead: %s", engine.engine_id, engine.url, reason)

    def _readmit(self, engine: Engine) -> None:
        """An attached engine that answers again may have been restarted by its launcher with the base
        weights: it is admitted at the weight version it reports, so it serves nothing until a sync
        (or catch_up) brings it to the fleet's version, and it gets the loaded adapters back."""
        try:
            info = engine.client.get(f"{engine.url}/model_info", timeout=10).json()
            reported = parse_weight_version(info.get("weight_version"))
            for name, path in self.adapters.items():
                if name not in _loaded_adapters(engine):
                    engine.control(
                        "load_lora_adapter", {"lora_name": name, "lora_path": path, "pinned": False}
                    )
        except Exception as err:  # not ready after all: the next probe tries again
            logger.warning("engine %d answers /health but not its state yet: %s", engine.engine_id, err)
            return
        with self._cond:
            engine.weight_version = -1 if reported is None else reported
            engine.healthy = True
            self._cond.notify_all()
        if engine.weight_version != self.weight_version:
            logger.warning("engine %d is back at weights v%d (fleet v%d): not routed until it catches up",
                           engine.engine_id, engine.weight_version, self.weight_version)  # fmt: skip

    def stale_engines(self) -> list[Engine]:
        """Healthy engines whose weights are behind the fleet's (restarted or re-attached): they get
        no requests until a sync or catch_up brings them to the current version."""
        return [e for e in self.engines if e.healthy and e.weight_version != self.weight_version]

    def _restart(self, engine: Engine, reason: str) -> None:
        try:
            engine.server.kill(grace_s=2.0)
            port = engine.server.port
            version = self._restart_version
            for attempt in range(RESTART_ATTEMPTS):
                if attempt or not port_is_free(port, self.options.host):
                    taken = {e.server.port for e in self.engines if e.server} | {port}
                    port = free_port(self.options.host, None, taken)
                server = ServerProcess.launch(
                    self.rollout,
                    self._engine_options(engine.engine_id, version),
                    port,
                    self._log_path(engine.engine_id),
                    self._restart_model_path,
                )
                engine.server = server
                engine.url = server.url
                try:
                    server.wait_healthy(self.options.startup_timeout_s)
                    break
                except EngineStartError as err:  # e.g. its port taken before it bound it: a new port
                    exited = not server.alive()  # a start that timed out would only time out again
                    server.kill(grace_s=2.0)
                    if not exited or attempt + 1 == RESTART_ATTEMPTS:
                        raise
                    logger.warning("engine %d: restart attempt %d failed, trying again: %s",
                                   engine.engine_id, attempt + 1, str(err).splitlines()[0])  # fmt: skip
            for name, path in self.adapters.items():
                engine.control("load_lora_adapter", {"lora_name": name, "lora_path": path, "pinned": False})
            with self._cond:
                engine.weight_version = version
                engine.strikes = 0
                engine.healthy = True
                self._restart_log.append((engine.engine_id, time.time(), reason))
                self._cond.notify_all()
            logger.warning("engine %d restarted at %s (weights v%d)", engine.engine_id, engine.url, version)
        except Exception:
            logger.exception("engine %d: restart failed", engine.engine_id)
        finally:
            with self._cond:
                self._restarting.discard(engine.engine_id)
                self._cond.notify_all()

    def wait_restarts(self, timeout_s: float | None = None) -> None:
        """Block until no restart is in progress."""
        deadline = time.monotonic() + (timeout_s or self.options.startup_timeout_s + 30)
        with self._cond:
            while self._restarting:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"engines {sorted(self._restarting)} still restarting")
                self._cond.wait(left)

    @property
    def restarts(self) -> list[tuple[int, float, str]]:
        return list(self._restart_log)

    # --- routing ----------------------------------------------------------------------------------

    def _routable(self, engine: Engine) -> bool:
        # A restarted engine with older weights than the fleet's serves nothing until the next sync.
        return engine.healthy and engine.weight_version == self.weight_version

    def _acquire(self, avoid: set[int]) -> Engine:
        deadline = time.monotonic() + self.options.startup_timeout_s + self.rollout.timeout_s
        with self._cond:
            while True:
                if self._stop.is_set():
                    raise NoEngineAvailable("fleet is shut down")
                cap = self.rollout.max_inflight_per_engine
                routable = [e for e in self.engines if self._routable(e)]
                # A retry waits for an engine it has not failed on while one is routable (even if busy):
                # the engine that just failed is likely dead but not yet declared so.
                pool = [e for e in routable if e.engine_id not in avoid] or routable
                free = [e for e in pool if e.inflight < cap]
                if free:
                    turn = next(self._rr)
                    n = len(self.engines)
                    engine = min(free, key=lambda e: (e.inflight, (e.engine_id - turn) % n))
                    engine.inflight += 1
                    return engine
                coming = self._restarting or any(self._routable(e) for e in self.engines)
                if not coming:
                    raise NoEngineAvailable(
                        "no engine can take requests: "
                        + ", ".join(
                            f"engine {e.engine_id} healthy={e.healthy} weights=v{e.weight_version}"
                            f" (fleet v{self.weight_version})"
                            for e in self.engines
                        )  # fmt: skip
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NoEngineAvailable("timed out waiting for a free engine")
                self._cond.wait(min(left, 1.0))

    def _release(self, engine: Engine) -> None:
        with self._cond:
            engine.inflight -= 1
            self._cond.notify_all()

    # --- generation -------------------------------------------------------------------------------

    def resolve_adapter(self, schedule: str | Schedule | None, adapter: str | None) -> str | None:
        """The adapter a request uses: DistillSparse adapters serve the sparse path only."""
        dense = schedule_label(schedule) is None
        if adapter == ACTIVE:
            return None if dense else self.active_adapter
        if adapter is not None and dense:
            raise UserError(
                f"adapter '{adapter}' requested on the dense path: adapters serve sparse requests only"
            )
        if adapter is not None and adapter not in self.adapters:
            raise UserError(f"adapter '{adapter}' is not loaded (loaded: {sorted(self.adapters) or 'none'})")
        return adapter

    def _with_retries(self, call, label: str, on_stats=None):
        """Run call(engine) on routed engines until one answers, avoiding engines that already failed.
        Returns (result, engine, attempts); raises RolloutError listing every attempt's reason."""
        tried: set[int] = set()
        reasons: list[str] = []
        for attempt in range(1, self.options.max_attempts + 1):
            try:
                engine = self._acquire(tried)
            except NoEngineAvailable as err:
                reasons.append(str(err))
                break
            try:
                return call(engine), engine, attempt
            except RequestRejected:
                raise
            except EngineFailure as err:
                reasons.append(f"attempt {attempt} on engine {engine.engine_id}: {err}")
                tried.add(engine.engine_id)
                if on_stats is not None:
                    on_stats(engine)
                self._probe(engine, str(err))
            finally:
                self._release(engine)
        raise RolloutError(f"{label}: " + ("; ".join(reasons) or "no attempt made"))

    def score(
        self,
        prompt_ids: Sequence[int],
        output_ids: Sequence[int],
        schedule: str | Schedule | None = None,
        adapter: str | None = None,
        top_logprobs: int | None = None,
    ) -> ScoredTokens:
        """Teacher-forced log-probs + top-K of output_ids after prompt_ids (dense unless a schedule is
        given): the engine-side reference distribution at exactly the positions of a rollout."""
        if len(prompt_ids) == 0 or len(output_ids) == 0:
            raise UserError("score: prompt and response must be non-empty")
        top_k = self.rollout.top_k_logprobs if top_logprobs is None else top_logprobs
        lora = self.resolve_adapter(schedule, adapter)
        parsed, engine, _ = self._with_retries(
            lambda e: e.score(list(prompt_ids), list(output_ids), top_k, schedule, lora), "score"
        )
        version = parsed.weight_version if parsed.weight_version is not None else engine.weight_version
        return ScoredTokens(list(prompt_ids), parsed.output_ids, parsed.logprobs, parsed.top_ids,
                            parsed.top_logprobs, engine.engine_id, version)  # fmt: skip

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams | None = None,
        n: int = 1,
        schedule: str | Schedule | None = None,
        adapter: str | None = ACTIVE,
        top_logprobs: int | None = None,
        progress: bool = False,
        on_sample: Callable[[Sample], None] | None = None,
    ) -> GenerationResult:
        """n samples of each prompt (token ids). schedule None/"dense" is the dense path; otherwise a
        preset name, schedule file or Schedule sent with every request. Raises RolloutError listing
        every request that failed on all its attempts (after the rest of the batch finished).

        on_sample(sample) is called as each sample completes, in the thread that requested it (so it
        must be quick: hand the sample on, e.g. to a reward judge), so work on finished samples
        overlaps the generation of the rest; an exception it raises ends generate() after the batch."""
        if n < 1:
            raise UserError(f"generate: n must be >= 1, got {n}")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise UserError(f"generate: prompt {i} is empty")
        sampling = sampling or SamplingParams()
        top_k = self.rollout.top_k_logprobs if top_logprobs is None else top_logprobs
        lora = self.resolve_adapter(schedule, adapter)
        stats = {e.engine_id: EngineStats(e.engine_id, e.url) for e in self.engines}
        stats_lock = threading.Lock()
        jobs = [(i, j) for i in range(len(prompts)) for j in range(n)]
        results: dict[tuple[int, int], Sample] = {}
        failures: dict[tuple[int, int], str] = {}
        batch_id = f"{time.time_ns():x}"

        def count_failure(engine: Engine) -> None:
            with stats_lock:
                stats[engine.engine_id].failures += 1

        def run(job: tuple[int, int]) -> None:
            i, j = job
            prompt = list(prompts[i])
            times = {}
            # Distinct, reproducible seeds per sample: equal seeds would make a GRPO group identical.
            job_sampling = (
                sampling if sampling.seed is None else replace(sampling, seed=sampling.seed + i * n + j)
            )

            def call(engine: Engine):
                times["start"] = time.perf_counter()
                return engine.generate(
                    prompt, job_sampling, top_k, schedule, lora, rid=f"{batch_id}-{i}-{j}-{time.time_ns()}"
                )

            try:
                (parsed, latency), engine, attempts = self._with_retries(
                    call, f"prompt {i} sample {j}", count_failure
                )
            except RolloutError as err:
                failures[job] = str(err).split(": ", 1)[1]
                return
            end = time.perf_counter()
            with stats_lock:
                st = stats[engine.engine_id]
                st.requests += 1
                st.output_tokens += len(parsed.output_ids)
                st.first_start = (
                    times["start"] if st.first_start is None else min(st.first_start, times["start"])
                )
                st.last_end = end if st.last_end is None else max(st.last_end, end)
            results[job] = sample = engine.to_sample(parsed, latency, prompt, i, j, schedule, lora, attempts)
            if on_sample is not None:
                on_sample(sample)

        workers = max(1, min(len(jobs), len(self.engines) * self.rollout.max_inflight_per_engine))
        t0 = time.perf_counter()
        with self._update_lock, ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rollout") as pool:
            futures = [pool.submit(run, job) for job in jobs]
            bar = _progress(len(futures), progress)
            rejected: BaseException | None = None
            for fut in futures:
                try:
                    fut.result()
                except RequestRejected as err:
                    rejected = rejected or err
                bar.update(1)
            bar.close()
        if rejected is not None:
            raise rejected
        if failures:
            lines = [f"prompt {i} sample {j}: {why}" for (i, j), why in sorted(failures.items())]
            raise RolloutError(
                f"{len(failures)} of {len(jobs)} requests failed on every engine:\n" + "\n".join(lines)
            )
        samples = [[results[(i, j)] for j in range(n)] for i in range(len(prompts))]
        # Routing admits only engines at the fleet's version (updates wait for the batch): a sample
        # that reports another version was served by weights the loop did not intend.
        stale = sum(s.weight_version != self.weight_version for g in samples for s in g)
        if stale:
            logger.error("%d samples report a weight version other than the fleet's v%d", stale,
                         self.weight_version)  # fmt: skip
        return GenerationResult(samples, stats, time.perf_counter() - t0, stale)

    # --- weights ----------------------------------------------------------------------------------

    def _on_all(self, fn, what: str, targets: list[Engine] | None = None) -> list:
        """Run fn(engine) on every healthy engine (or the given ones) in parallel; engines that fail are
        marked dead and left behind (stale: no requests until a later sync); raise if none succeeded."""
        targets = [e for e in self.engines if e.healthy] if targets is None else targets
        if not targets:
            raise EngineFailure(f"{what}: no healthy engine")
        errors: dict[int, BaseException] = {}

        def call(engine: Engine):
            try:
                return fn(engine)
            except EngineFailure as err:
                errors[engine.engine_id] = err
                self._mark_dead(engine, f"{what}: {err}")
                return None

        with ThreadPoolExecutor(max_workers=len(targets)) as pool:
            list(pool.map(call, targets))
        if len(errors) == len(targets):
            raise EngineFailure(
                f"{what} failed on every engine: " + "; ".join(f"engine {i}: {e}" for i, e in errors.items())
            )
        for i, err in errors.items():
            logger.error("%s failed on engine %d (left stale): %s", what, i, err)
        return [e for e in targets if e.engine_id not in errors]

    def _drain(self, targets: list[Engine] | None) -> list[Engine]:
        """Before a weight update: each engine (healthy ones, or `targets`) waits until it runs no request
        and flushes its cache. Requests dropped by their client (a timeout, an abort) still run until the
        scheduler gets to them, and SGLang refuses an update that cannot flush. An engine still busy after
        DRAIN_TIMEOUT_S is marked dead (left stale); returns the others, [] if none (the sync then fails
        the way it does with no engine)."""
        try:
            return self._on_all(lambda e: e.drain(DRAIN_TIMEOUT_S), "flush_cache", targets)
        except EngineFailure as err:
            logger.error("no engine is ready for a weight update: %s", err)
            return []

    def sync_weights(self, buckets: Iterable[Bucket], catch_up: bool = False) -> int:
        """Push the trainer's weights (an iterator of [(hf_name, tensor)] buckets) to every engine over HTTP,
        inside begin/end_weight_update. Returns the new weight version, recorded on later samples.
        catch_up: send the current weights, at the current version, to the stale engines only."""
        with self._update_lock:
            version = self.weight_version if catch_up else self.weight_version + 1
            tp = self.rollout.engine_tp
            targets = self.stale_engines() if catch_up else None
            it = iter(buckets)
            try:
                live = self._on_all(
                    lambda e: e.control("begin_weight_update", {}),
                    "begin_weight_update",
                    self._drain(targets),
                )
                count = sent = 0
                for bucket in it:
                    payload = tensor_update_payload(bucket, tp, None)  # the version only once complete
                    count += len(bucket)
                    sent += sum(len(s) for s in payload["serialized_named_tensors"]) * len(live)
                    # Every engine at once; the next bucket only when all have this one (their order).
                    live = self._on_all(lambda e, p=payload: e.control("update_weights_from_tensor", p),
                                        "update_weights_from_tensor", live)  # fmt: skip
                if count == 0:
                    raise UserError("sync_weights: the bucket iterator was empty")
                live = self._on_all(lambda e: e.control("end_weight_update", {}), "end_weight_update", live)
                live = self._stamp_version(live, version)
            except EngineFailure:
                # The iterator is collective on the trainer ranks (TP gathers, PP broadcasts): the other
                # ranks walk it to its end, so this one must too, or they hang in their next collective.
                for _ in it:
                    pass
                raise
            self.last_sync_bytes = sent
            self._commit_version(live, version)
            return version

    def sync_weights_from_disk(self, model_path: str | Path, catch_up: bool = False) -> int:
        """Every engine reloads an HF checkpoint directory (written once, read once per engine);
        restarts load it too from now on. catch_up: the stale engines only, at the current version."""
        path = str(Path(model_path).resolve())
        if not Path(path, "config.json").is_file():
            raise UserError(f"{path}: not an HF checkpoint directory (no config.json)")
        with self._update_lock:
            version = self.weight_version if catch_up else self.weight_version + 1
            targets = self.stale_engines() if catch_up else None
            payload = {"model_path": path, "weight_version": str(version), "flush_cache": True}
            live = self._on_all(
                lambda e: e.control("update_weights_from_disk", payload),
                "update_weights_from_disk",
                self._drain(targets),
            )
            self._restart_model_path, self._restart_version = path, version
            self.last_sync_bytes = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
            self._commit_version(live, version)
            return version

    def init_distributed_sync(
        self, spec: DistributedGroupSpec, timeout_s: float | None = None, stages: int = 1
    ):
        """Build the trainer<->engines broadcast group (trainer = rank 0; NCCL on GPU, gloo on CPU).
        Later syncs rebuild it by themselves when the healthy engines change.
        stages > 1 (a pipeline-parallel trainer): one group per stage, each stage's weights sent by the
        trainer rank holding them (rollout/staged_sync.py); built at the first sync, when the other
        stages' senders take part, and each weights call must carry `distributed_relay()`."""
        if spec.backend == "nccl" and not cuda_available():
            raise UserError(
                "init_distributed_sync: backend 'nccl' needs CUDA; use backend 'gloo' or HTTP on CPU"
            )
        from sparrow_megatron.rollout.dist_sync import DistributedSync

        if self._dist is not None:
            self._dist.destroy()
        if stages > 1:
            from sparrow_megatron.rollout.staged_sync import StagedSync

            self._dist = StagedSync(self, spec, stages, timeout_s or self.rollout.timeout_s)
            return self._dist
        self._dist = DistributedSync(self, spec, timeout_s or self.rollout.timeout_s)
        with self._update_lock:
            self._dist.ensure_group()
        return self._dist

    def distributed_relay(self) -> dict:
        """What the pipeline stages' senders need for the next distributed sync attempt (stages > 1)."""
        return self._dist.relay()

    def sync_weights_distributed(
        self, buckets: Iterable[Bucket] | Callable[[], Iterable[Bucket]], catch_up: bool = False
    ) -> int:
        """Broadcast each bucket from the trainer while every healthy engine receives it through
        /update_weights_from_distributed (inside begin/end). Needs init_distributed_sync first.

        buckets may be a callable making a fresh iterator: then a sync that loses engines (they are
        marked dead, restarted if launched, and rejoin at a later sync) runs once more with the rest.
        catch_up: the current weights at the current version (the group now includes engines that
        came back); the engines already current receive them again."""
        from sparrow_megatron.rollout.dist_sync import SyncFailed

        if self._dist is None:
            raise UserError("sync_weights_distributed: call init_distributed_sync first")
        tries = 2 if callable(buckets) else 1
        with self._update_lock:
            version = self.weight_version if catch_up else self.weight_version + 1
            self._drain(self.stale_engines() if catch_up else None)  # the group is built of the healthy ones
            for attempt in range(tries):
                try:
                    live = self._dist.broadcast(buckets() if callable(buckets) else buckets)
                    break
                except SyncFailed as err:
                    if attempt + 1 == tries:
                        raise
                    logger.error("%s; retrying with the engines left", err)
            live = self._stamp_version(live, version)
            self.last_sync_bytes = self._dist.last_bytes
            self.last_sync_stage_bytes = list(self._dist.last_stage_bytes)
            self._commit_version(live, version)
            return version

    def _stamp_version(self, live: list[Engine], version: int) -> list[Engine]:
        """Tell the engines that hold every bucket their new version. Sent once the last bucket is in, not
        with each bucket: an engine lost mid-sync then reports its old version when it answers again, so
        it is caught up before it serves instead of being admitted with half the new weights."""
        payload = {"new_version": str(version), "abort_all_requests": False}
        return self._on_all(
            lambda e: e.control("update_weight_version", payload), "update_weight_version", live
        )

    def _commit_version(self, live: list[Engine], version: int) -> None:
        with self._cond:
            for e in live:
                e.weight_version = version
            self.weight_version = version
            self._cond.notify_all()

    def continue_versions(self, weight_version: int, adapter_version: int = 0) -> None:
        """A resumed run's numbering: the next weight sync is weight_version + 1 and the next adapter
        adapter_version + 1, as in the uninterrupted run (samples record the version that served them)."""
        with self._update_lock:
            self.weight_version = weight_version
            self._adapter_counter = itertools.count(adapter_version + 1)

    # --- adapters ---------------------------------------------------------------------------------

    def load_adapter(self, path: str | Path, base_name: str = "distill", activate: bool = True) -> str:
        """Load a PEFT adapter directory on every engine under a fresh versioned name (SGLang refuses a
        name twice); with activate, sparse requests use it and the previous active adapter is unloaded."""
        if self.options.lora is None and not self.rollout.urls:
            raise UserError("load_adapter: the fleet was launched without LoRA (set FleetOptions.lora)")
        path = str(Path(path).resolve())
        if not Path(path, "adapter_config.json").is_file():
            raise UserError(f"{path}: not a PEFT adapter directory (no adapter_config.json)")
        name = f"{base_name}-v{next(self._adapter_counter)}"
        with self._update_lock:
            payload = {"lora_name": name, "lora_path": path, "pinned": False}
            self._on_all(lambda e: e.control("load_lora_adapter", payload), f"load_lora_adapter {name}")
            self.adapters[name] = path
            previous = self.active_adapter
            if activate:
                self.active_adapter = name
        if activate and previous is not None:
            self.unload_adapter(previous)
        return name

    def unload_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise UserError(f"unload_adapter: '{name}' is not loaded")
        with self._update_lock:
            self._on_all(
                lambda e: e.control("unload_lora_adapter", {"lora_name": name}), f"unload_lora_adapter {name}"
            )
            del self.adapters[name]
            if self.active_adapter == name:
                self.active_adapter = None


def _loaded_adapters(engine: Engine) -> set[str]:
    """LoRA names an engine has loaded (SGLang's /v1/models lists them next to the base model)."""
    body = engine.client.get(f"{engine.url}/v1/models", timeout=10).json()
    return {m.get("id") for m in body.get("data", [])}


class _NullBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NullBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="rollout", unit="req")
