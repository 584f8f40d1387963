"""Streaming throughput of one Python process: the official `openai` package
against an OpenAI-compatible endpoint, and the `cnse` SDK against cnse-dp,
side by side in one run (docs/BENCHMARKS.md, issue 16).

Sides (each: --streams concurrent streams in one asyncio loop, a closed
loop of requests for --max-tokens tokens, tokens counted as they arrive in
the measured window; an "item" is what the loop body sees: an `openai`
chunk, a cnse text piece, which holds every token that arrived since the
previous one):

  openai          openai.AsyncOpenAI -> `cnse-dp llama-standin` /v1/completions
  cnse-llama      cnse.AsyncClient (one connection) -> cnse-dp serve
                  --backend llama -> the same stand-in (/completion)
  cnse-synthetic  cnse.AsyncClient (one connection) -> cnse-dp serve with the
                  synthetic backend at the same pace

The stand-in sends one token per SSE event, so an `openai` chunk with text
is one token; cnse counts tokens from the TOKENS frames (`stream.tokens`).
Rounds alternate the order of the sides so that drift hits all alike. Run
with scripts/bench-python.sh (venv, wheel, openai), or directly with a
Python that has both packages.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import threading
import time
from typing import Callable, Dict, List, Tuple

import cnse
import openai

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


class Proc:
    """A cnse-dp child process that prints `listening on ADDR` first."""

    def __init__(self, args: List[str]) -> None:
        self.p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        first: List[str] = []
        ready = threading.Event()

        def pump() -> None:
            assert self.p.stdout is not None
            first.append(self.p.stdout.readline())
            ready.set()
            for _ in self.p.stdout:
                pass

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(10) or not first[0].startswith("listening on "):
            self.stop()
            raise SystemExit(f"{args} printed no address: {first}")
        self.addr = first[0].split()[2]

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
        self.p.wait()


class Window:
    """Counts tokens arriving between the end of the warm-up and the end."""

    def __init__(self, warmup_s: float, duration_s: float) -> None:
        now = time.monotonic()
        self.start = now + warmup_s
        self.end = self.start + duration_s
        self.tokens = 0
        self.items = 0
        self.requests = 0

    def add(self, n: int) -> bool:
        """Counts one item of `n` tokens now; False once the window is over."""
        t = time.monotonic()
        if t >= self.end:
            return False
        if t >= self.start:
            self.tokens += n
            self.items += 1
        return True


async def openai_worker(client: "openai.AsyncOpenAI", w: Window, prompt: str, max_tokens: int) -> None:
    while time.monotonic() < w.end:
        stream = await client.completions.create(model="standin", prompt=prompt, max_tokens=max_tokens, stream=True)
        try:
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    if not w.add(1):
                        return
        finally:
            await stream.close()
        w.requests += 1


async def cnse_worker(client: cnse.AsyncClient, w: Window, prompt: str, max_tokens: int) -> None:
    while time.monotonic() < w.end:
        st = client.stream(prompt, max_tokens=max_tokens)
        seen = 0
        try:
            async for _text in st:
                n = st.tokens
                if not w.add(n - seen):
                    return
                seen = n
        finally:
            st.close()
        w.requests += 1


async def run_openai(url: str, a: argparse.Namespace) -> Window:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    w = Window(a.warmup, a.duration)
    try:
        await asyncio.gather(*[openai_worker(client, w, a.prompt, a.max_tokens) for _ in range(a.streams)])
    finally:
        await client.close()
    return w


async def run_cnse(addr: str, a: argparse.Namespace) -> Window:
    async with cnse.AsyncClient(addr, window=a.window) as client:
        w = Window(a.warmup, a.duration)
        await asyncio.gather(*[cnse_worker(client, w, a.prompt, a.max_tokens) for _ in range(a.streams)])
    return w


def measure(name: str, run: Callable[[], Window], a: argparse.Namespace) -> Tuple[float, float]:
    cpu0, t0 = time.process_time(), time.monotonic()
    w = run()
    cpu = time.process_time() - cpu0
    rate = w.tokens / a.duration
    per_cpu = w.tokens / cpu if cpu > 0 else 0.0
    per_item = w.tokens / w.items if w.items else 0.0
    print(f"  {name:<15} {rate:>12,.0f} tokens/s  {w.items / a.duration:>10,.0f} items/s "
          f"({per_item:5.1f} tokens/item)  {w.requests:>7} requests  "
          f"process CPU {cpu:5.2f} s over {time.monotonic() - t0:4.1f} s", flush=True)
    return rate, per_cpu


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", default=os.environ.get("CNSE_DP_BIN", os.path.join(ROOT, "target/release/cnse-dp")))
    p.add_argument("--streams", type=int, default=64, help="concurrent streams per side")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--prompt", default="Write a haiku about the sea.")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per side and round")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--ttft-us", type=int, default=0, help="pace of the stand-in and of the synthetic backend")
    p.add_argument("--token-interval-us", type=int, default=0)
    p.add_argument("--window", type=int, default=cnse.WINDOW_DEFAULT, help="cnse credit window")
    p.add_argument("--server-threads", type=int, default=1)
    a = p.parse_args()

    pace = ["--synthetic-ttft-us", str(a.ttft_us), "--synthetic-token-interval-us", str(a.token_interval_us)]
    standin = Proc([a.bin, "llama-standin", "--ttft-us", str(a.ttft_us), "--token-interval-us", str(a.token_interval_us)])
    common = ["serve", "--listen", "127.0.0.1:0", "--no-pin", "--threads", str(a.server_threads)]
    via_llama = Proc([a.bin, *common, "--backend", "llama", "--llama-url", standin.addr,
                      "--llama-inflight", str(max(a.streams, 1))])
    synthetic = Proc([a.bin, *common, *pace])
    sides: Dict[str, Callable[[], Window]] = {
        "openai": lambda: asyncio.run(run_openai(standin.addr, a)),
        "cnse-llama": lambda: asyncio.run(run_cnse(via_llama.addr, a)),
        "cnse-synthetic": lambda: asyncio.run(run_cnse(synthetic.addr, a)),
    }
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs; Python {platform.python_version()}, "
          f"openai {openai.__version__}, cnse {cnse.__version__}")
    print(f"{a.streams} streams per side, max_tokens {a.max_tokens}, pace ttft {a.ttft_us} µs / "
          f"interval {a.token_interval_us} µs, {a.rounds} round(s) of {a.duration:.0f} s (+{a.warmup:.0f} s warm-up)")
    rates: Dict[str, List[float]] = {k: [] for k in sides}
    per_cpu: Dict[str, List[float]] = {k: [] for k in sides}
    try:
        for r in range(a.rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            print(f"round {r + 1}: {' -> '.join(order)}")
            for name in order:
                rate, pc = measure(name, sides[name], a)
                rates[name].append(rate)
                per_cpu[name].append(pc)
    finally:
        for proc in (synthetic, via_llama, standin):
            proc.stop()
    base = statistics.median(rates["openai"])
    base_cpu = statistics.median(per_cpu["openai"])
    print(f"{'side':<15} {'tokens/s (median)':>18} {'vs openai':>10} {'tokens per CPU-s':>17} {'vs openai':>10}")
    for name in sides:
        m, c = statistics.median(rates[name]), statistics.median(per_cpu[name])
        print(f"{name:<15} {m:>18,.0f} {m / base if base else 0:>9.1f}x {c:>17,.0f} {c / base_cpu if base_cpu else 0:>9.1f}x")


if __name__ == "__main__":
    main()
