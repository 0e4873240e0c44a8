"""Pools that judge samples while the fleet still generates: every judgement a future, every failure a 0.

- `ProcessJudgePool`: `workers` long-lived processes (started once, on first use, and kept across
  steps), each call under a hard wall-clock limit. math-verify (sympy) can hang on adversarial output,
  in C code where no signal reaches it: a judgement past `timeout_s` has its process killed (a fresh
  one takes its place), and scores 0 with the reason "timeout".
- `ThreadJudgePool`: threads for judges that wait rather than compute (code rewards wait on their
  sandboxes, which bound the programs' own resources).

A judge that raises scores 0 ("crashed"), one whose process dies scores 0 ("died"); only exceptions
listed as `fatal` (a refusal to run at all, such as missing sandbox isolation) reach the caller.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import signal
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Why a judgement scored 0 without a verdict (`reward/judge_errors/<reason>` in the step's metrics).
TIMEOUT, CRASHED, DIED = "timeout", "crashed", "died"
JUDGE_ERROR_REASONS = (TIMEOUT, CRASHED, DIED)
START_TIMEOUT_S = 300.0  # a worker process importing sympy on a loaded node; not part of any judgement


class JudgeUnavailable(RuntimeError):
    """A judge process cannot start (its imports fail): the step stops instead of scoring 0s."""


@dataclass(frozen=True)
class Judgement:
    reward: float
    error: str = ""  # "" = judged; else one of JUDGE_ERROR_REASONS (the reward is then 0)
    detail: str = ""  # what went wrong, for the log

    @classmethod
    def failed(cls, reason: str, detail: str) -> Judgement:
        return cls(0.0, reason, detail[:300])


def _crash(err: BaseException) -> Judgement:
    return Judgement.failed(CRASHED, f"{type(err).__name__}: {err}")


class ThreadJudgePool:
    """`workers` threads running `fn(*args) -> float`; a raised exception is a 0 ("crashed")."""

    def __init__(self, workers: int, fatal: tuple[type[BaseException], ...] = ()):
        self.workers = workers
        self.fatal = fatal
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="judge")

    def submit(self, fn: Callable[..., float], *args) -> Future[Judgement]:
        return self._executor.submit(self._run, fn, args)

    def _run(self, fn, args) -> Judgement:
        try:
            return Judgement(float(fn(*args)))
        except self.fatal:
            raise
        except Exception as err:  # noqa: BLE001 - no model output may stop the step
            return _crash(err)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def _serve(conn, preload: tuple[str, ...]) -> None:
    """A worker process: import what the judges need once, then run calls until told to stop."""
    import importlib

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    try:
        for name in preload:
            importlib.import_module(name)
    except BaseException as err:  # noqa: BLE001 - told to the parent, which refuses to judge
        conn.send(f"{type(err).__name__}: {err}")
        return
    conn.send("ready")
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        fn, args = job
        try:
            result = (True, float(fn(*args)))
        except Exception as err:  # noqa: BLE001 - reported to the parent as a crash
            result = (False, f"{type(err).__name__}: {err}")
        conn.send(result)


class _Worker:
    """One judge process and the pipe to it; restarted after a kill or a death."""

    def __init__(self, ctx, preload: tuple[str, ...]):
        self.ctx, self.preload = ctx, preload
        self.proc = None
        self.conn = None

    def _ensure(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            return
        self.stop()
        parent, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_serve, args=(child, self.preload), daemon=True, name="judge")
        self.proc.start()
        child.close()
        self.conn = parent
        # Ready before the clock of any judgement starts: imports are not the judged output's fault.
        try:
            answer = (
                parent.recv() if parent.poll(START_TIMEOUT_S) else f"no answer in {START_TIMEOUT_S:.0f} s"
            )
        except EOFError:
            answer = "it exited"
        if answer != "ready":
            self.stop()
            raise JudgeUnavailable(
                f"a judge process could not start ({answer}); preloading {list(self.preload)}"
            )

    def call(self, fn, args, timeout_s: float) -> Judgement:
        self._ensure()
        try:
            self.conn.send((fn, args))
            if not self.conn.poll(timeout_s):
                self.stop()  # the only way to stop a call stuck in C code
                return Judgement.failed(TIMEOUT, f"no verdict within {timeout_s:g} s: process killed")
            ok, value = self.conn.recv()
        except (EOFError, OSError) as err:  # killed by the OOM killer, a segfault, close() meanwhile
            code = None
            if self.proc is not None:
                self.proc.join(timeout=5)  # reap it, for its exit code
                code = self.proc.exitcode
            self.stop()
            return Judgement.failed(DIED, f"judge process died (exit code {code}): {err}")
        return Judgement(value) if ok else Judgement.failed(CRASHED, value)

    def stop(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.proc is not None:
            if self.proc.is_alive():
                self.proc.kill()
            self.proc.join(timeout=10)
            self.proc = None


class ProcessJudgePool:
    """`workers` processes running picklable `fn(*args) -> float` (module-level functions), each call
    killed past `timeout_s`. Processes start on the first submit (spawned: the trainer process holds
    threads and CUDA state that a fork would copy) and live until close()."""

    def __init__(self, workers: int, timeout_s: float, preload: tuple[str, ...] = ()):
        self.workers, self.timeout_s = workers, timeout_s
        self._ctx = mp.get_context("spawn")
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._all = [_Worker(self._ctx, preload) for _ in range(workers)]
        for w in self._all:
            self._idle.put(w)
        self._closed = threading.Event()
        # One thread per process: a thread holds a worker for the whole call, so at most `workers`
        # judgements run at once and each waits on its own pipe.
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="judge")

    def submit(self, fn: Callable[..., float], *args) -> Future[Judgement]:
        return self._executor.submit(self._run, fn, args)

    def _run(self, fn, args) -> Judgement:
        if self._closed.is_set():
            return Judgement.failed(DIED, "judge pool closed")
        worker = self._idle.get()
        try:
            return worker.call(fn, args, self.timeout_s)
        except JudgeUnavailable:
            raise  # no judge at all: scoring every sample 0 would train on nothing, silently
        except Exception as err:  # noqa: BLE001 - a pickling error
            return _crash(err)
        finally:
            self._idle.put(worker)

    def close(self) -> None:
        self._closed.set()
        for w in self._all:  # a call in flight sees its pipe close and ends as "died"
            w.stop()
        self._executor.shutdown(wait=True, cancel_futures=True)
