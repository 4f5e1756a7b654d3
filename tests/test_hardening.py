"""Hardening against a bad dashboard server and against two runs in one directory.

The W&B tests start local fake servers (one answers 404, one accepts and never answers, one
port refuses) and check that training falls back to offline and goes on; the run-directory
tests start a real second ``scripts/train.py`` next to a running one.
"""

from __future__ import annotations

import http.server
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowerdiff.files import atomic_write, partial_path
from flowerdiff.infra.loggers import RUN_ID_FILE
from flowerdiff.infra.rundir import LOCK_FILE, RunDirectoryBusy, run_directory_lock

from conftest import REPO_ROOT, TINY_OVERRIDES

FAKE_KEY = "a" * 40


class _Handler(http.server.BaseHTTPRequestHandler):
    hang = False

    def _answer(self) -> None:
        if self.hang:
            time.sleep(600)
        self.send_response(404)
        self.end_headers()
        self.wfile.write(b'{"errors": [{"message": "not found"}]}')

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_wandb_server(request: pytest.FixtureRequest) -> Iterator[str]:
    """``http://127.0.0.1:<port>`` of a server that answers 404, never answers, or is absent.

    Every port is bound here and held for the whole test (a server on port 0; for "refuses" a
    socket that is bound but never listens, so connections are refused): no probe-then-bind
    window in which another test worker could take the port."""
    kind = request.param
    if kind == "refuses":
        with socket.socket() as bound_not_listening:
            bound_not_listening.bind(("127.0.0.1", 0))
            yield f"http://127.0.0.1:{bound_not_listening.getsockname()[1]}"
        return
    handler = type("Handler", (_Handler,), {"hang": kind == "hangs"})
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def train_command(run_dir: Path, image_folder: Path, *extra: str) -> list[str]:
    overrides = [o for o in TINY_OVERRIDES if not o.startswith("logger=")]
    return [
        sys.executable,
        str(REPO_ROOT / "scripts" / "train.py"),
        *overrides,
        "logger=wandb",
        "~callbacks.denoising_grid",
        f"data.root={image_folder}",
        f"paths.root_dir={run_dir.parent}",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def wandb_env(server: str | None, home: Path) -> dict[str, str]:
    """The child's W&B settings: its config, cache and data folders under ``home`` (the test's
    own: parallel test workers never share ~/.config/wandb)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(OMP_NUM_THREADS="1", WANDB_INIT_TIMEOUT="3", WANDB_SILENT="true")
    for name in ("CONFIG", "CACHE", "DATA"):
        env[f"WANDB_{name}_DIR"] = str(home / f"wandb-{name.lower()}")
    if server is None:
        env["WANDB_MODE"] = "offline"
    else:  # "logged in" against a server that misbehaves
        env.update(WANDB_BASE_URL=server, WANDB_API_KEY=FAKE_KEY)
    return env


@pytest.mark.slow
@pytest.mark.parametrize("fake_wandb_server", ["answers_404", "hangs", "refuses"], indirect=True)
def test_a_bad_wandb_server_never_stops_training(
    fake_wandb_server: str, image_folder: Path, tmp_path: Path
) -> None:
    started = time.monotonic()
    result = subprocess.run(
        train_command(tmp_path / "run", image_folder),
        env=wandb_env(fake_wandb_server, tmp_path),
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()  # it trained
    offline = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, "the run must have logged offline"
    assert "wandb sync" in output  # one line saying how to upload it
    assert "Traceback" not in output
    assert time.monotonic() - started < 200


@pytest.mark.slow
def test_a_resumed_run_continues_the_same_wandb_run(image_folder: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    for extra in ([], ["ckpt_path=last", "trainer.max_epochs=2"]):
        result = subprocess.run(
            train_command(run_dir, image_folder, *extra),
            env=wandb_env(None, tmp_path),
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2  # one per process...
    assert all(path.name.endswith(f"-{run_id}") for path in offline)  # ...one W&B run


def test_atomic_writes_never_share_a_temp_file(tmp_path: Path) -> None:
    """Two processes saving one target at once each write their own temp file: both saves
    succeed and the target is one of the two, whole (the old fixed temp name made the second
    rename fail)."""
    target = tmp_path / "last.ckpt"
    assert partial_path(target) != partial_path(target)
    assert "last" not in partial_path(target).name  # Lightning's "last" lookup ignores them
    payloads = [bytes([1]) * 2_000_000, bytes([2]) * 2_000_000]
    errors: list[BaseException] = []

    def save(data: bytes) -> None:
        try:
            for _ in range(5):
                atomic_write(target, lambda file: file.write(data))
        except BaseException as error:  # pragma: no cover - the assertion below reports it
            errors.append(error)

    threads = [threading.Thread(target=save, args=(p,)) for p in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert target.read_bytes() in payloads
    assert not list(tmp_path.glob(".tmp-*"))


def test_the_run_directory_lock_is_exclusive_and_dies_with_its_holder(tmp_path: Path) -> None:
    with run_directory_lock(tmp_path):
        assert "pid" in (tmp_path / LOCK_FILE).read_text()
        holder = subprocess.run(
            [
                sys.executable,
                "-c",
                "from flowerdiff.infra.rundir import run_directory_lock\n"
                f"with run_directory_lock({str(tmp_path)!r}): pass",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert holder.returncode != 0 and "RunDirectoryBusy" in holder.stderr
    # A process killed while holding it leaves no lock behind.
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nfrom flowerdiff.infra.rundir import run_directory_lock\n"
            f"with run_directory_lock({str(tmp_path)!r}): print('held', flush=True); "
            "time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "held"
    with pytest.raises(RunDirectoryBusy, match="Another run"), run_directory_lock(tmp_path):
        pass
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    with run_directory_lock(tmp_path):  # free again
        pass


def test_stale_partial_files_are_removed_by_the_next_holder(tmp_path: Path) -> None:
    stale = partial_path(tmp_path / "checkpoints" / "last.ckpt")
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a checkpoint from a run killed during a save")
    with run_directory_lock(tmp_path):
        assert not stale.exists()


@pytest.mark.slow
def test_a_second_run_in_a_busy_directory_stops_at_once(image_folder: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        train_command(run_dir, image_folder, "logger=csv", "trainer.max_epochs=200"),
        env=wandb_env(None, tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoints" / "last.ckpt").is_file():  # the first one trains
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        started = time.monotonic()
        second = subprocess.run(
            train_command(run_dir, image_folder, "logger=csv"),
            env=wandb_env(None, tmp_path),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 1
        assert "Error: Another run (pid" in second.stderr and str(run_dir) in second.stderr
        assert "Traceback" not in second.stderr
        assert time.monotonic() - started < 60  # before any data or model work
    finally:
        first.kill()
        first.wait(timeout=30)
