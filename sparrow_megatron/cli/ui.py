"""`sparrow ui [RUN_DIR | STORE]`: the MLflow UI for a run directory or a store, wherever it now lives.

Starts `mlflow server` on 127.0.0.1 on the store (mlflow.db beside the run directories) with its
artifact root (mlartifacts/ beside the db) and prints the store's link and, for a run directory, the
direct link to its run page in the model-training view. Runs until Ctrl-C, then stops the server and
its workers. A run tracked on a remote server (tracking.mlflow_uri=http...) gets its link printed.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

from sparrow_megatron.errors import UserError
from sparrow_megatron.loop.tracking import ARTIFACTS_DIR, STORE_FILE, run_page_url, saved_run

START_TIMEOUT_S = 120.0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "ui", help="serve the MLflow UI for a run directory or a store; print the run's link"
    )
    p.add_argument(
        "target",
        nargs="?",
        default="runs",
        help="a run directory, a directory holding mlflow.db, or the mlflow.db file (default: runs)",
    )
    p.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default 5000)")
    p.set_defaults(func=run)


def resolve(target: str | Path) -> tuple[Path | None, dict | None]:
    """(the local store's mlflow.db, the run record of a run directory) for a command-line target."""
    path = Path(target).expanduser()
    if not path.exists():
        raise UserError(f"{path}: no such run directory or MLflow store")
    if path.is_file():
        return path.resolve(), None
    record = saved_run(path)
    if record is None:
        if (path / STORE_FILE).is_file():
            return (path / STORE_FILE).resolve(), None
        raise UserError(f"{path}: neither a run directory (no mlflow_run.json) nor a store (no {STORE_FILE})")
    uri = record.get("uri", "")
    if uri.startswith(("http://", "https://")):
        return None, record
    # Beside the run directory first: where the store is after the project folder moved.
    for store in (path.resolve().parent / STORE_FILE, Path(uri.removeprefix("sqlite:///"))):
        if store.is_file():
            return store, record
    raise UserError(
        f"{path}: its MLflow store is neither beside it ({path.resolve().parent / STORE_FILE}) nor at {uri}"
    )


def server_command(store: Path, port: int) -> list[str]:
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{store}",
        "--artifacts-destination", str(store.parent / ARTIFACTS_DIR),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip


def wait_healthy(base: str, proc: subprocess.Popen, timeout_s: float = START_TIMEOUT_S) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"mlflow server exited with code {proc.returncode} (is port {base} taken?)")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise UserError(f"mlflow server did not answer {base}/health within {timeout_s:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    """The server and the workers it forked (they share our process group, so no killpg)."""
    import psutil

    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        p.kill()


def run_link(base: str, run_id: str) -> str:
    """The run's page on the server at `base` (asking it for the run's experiment)."""
    from mlflow.tracking import MlflowClient

    try:
        experiment_id = MlflowClient(base).get_run(run_id).info.experiment_id
    except Exception as err:
        raise UserError(f"run {run_id} is not in the store served at {base} ({err})") from None
    return run_page_url(base, experiment_id, run_id)


def run(args) -> int:
    store, record = resolve(args.target)
    if store is None:  # tracked on a server: nothing to start
        print(f"run: {run_page_url(record['uri'], record.get('experiment_id', '0'), record['run_id'])}")
        return 0
    base = f"http://127.0.0.1:{args.port}"
    # SIGTERM unwinds like Ctrl-C so the server is stopped either way.
    signal.signal(signal.SIGTERM, lambda signum, frame: (_ for _ in ()).throw(KeyboardInterrupt()))
    proc = subprocess.Popen(server_command(store, args.port), cwd=store.parent, stdout=subprocess.DEVNULL)
    try:
        wait_healthy(base, proc)
        print(f"MLflow UI on {store}: {base}", flush=True)
        if record is not None:
            print(f"run: {run_link(base, record['run_id'])}", flush=True)
        print("Ctrl-C stops it.", flush=True)
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop(proc)
    return 0
