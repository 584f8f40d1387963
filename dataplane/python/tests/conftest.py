"""Fixtures: the real cnse-dp binary on an ephemeral loopback port, waited
for through its `listening on ADDR` line (never a fixed sleep), killed at
the end. Every test runs under a watchdog: a hang fails the run with the
stacks instead of blocking it."""

from __future__ import annotations

import faulthandler
import os
import pathlib
import subprocess
import sys
import threading
from typing import Iterator, List, Optional

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
BIN = os.environ.get("CNSE_DP_BIN", str(ROOT / "target/release/cnse-dp"))
WAIT_S = 10.0
HANG_S = 120


class Server:
    """A `cnse-dp serve` child process."""

    def __init__(self, *extra: str) -> None:
        args = [BIN, "serve", "--listen", "127.0.0.1:0", "--no-pin"]
        if "--threads" not in extra:
            args += ["--threads", "1"]
        args += list(extra)
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first: List[str] = []
        got = threading.Event()

        def read_first() -> None:
            assert self.proc.stdout is not None
            first.append(self.proc.stdout.readline())
            got.set()
            for _ in self.proc.stdout:  # keep the pipe drained
                pass

        threading.Thread(target=read_first, daemon=True).start()
        if not got.wait(WAIT_S) or not first[0].startswith("listening on "):
            self.kill()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"cnse-dp serve {extra} printed no address: {first} {err}")
        self.addr = first[0].split()[2]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def client_cli(self, prompt: str, *args: str) -> str:
        """What `cnse-dp client` prints on stdout (the text and a newline)."""
        out = subprocess.run(
            [BIN, "client", "--addr", self.addr, "--prompt", prompt, *args],
            capture_output=True, text=True, timeout=60, check=True,
        )
        assert out.stdout.endswith("\n")
        return out.stdout[:-1]


@pytest.fixture
def serve() -> Iterator:
    """Starts servers with extra arguments; all are killed at the end."""
    started: List[Server] = []

    def start(*extra: str) -> Server:
        s = Server(*extra)
        started.append(s)
        return s

    yield start
    for s in started:
        s.kill()


@pytest.fixture
def server(serve) -> Server:
    """A server with the synthetic backend at a quick pace."""
    return serve("--synthetic-ttft-us", "2000", "--synthetic-token-interval-us", "200")


@pytest.fixture(autouse=True)
def watchdog() -> Iterator[None]:
    faulthandler.dump_traceback_later(HANG_S, exit=True, file=sys.stderr)
    yield
    faulthandler.cancel_dump_traceback_later()


def paced(ttft_us: int, interval_us: int) -> List[str]:
    return ["--synthetic-ttft-us", str(ttft_us), "--synthetic-token-interval-us", str(interval_us)]


def llama_url() -> Optional[str]:
    return os.environ.get("CNSE_LLAMA_URL")
