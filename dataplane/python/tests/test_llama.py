"""With the real llama-server backend, the SDK's text through cnse-dp equals
llama-server's own `/completion` answer at temperature 0 (as the Rust
tests/llama_gateway.rs checks for the Rust client).

The llama-server is `CNSE_LLAMA_URL`, else one started here with
scripts/llama-server.sh; when it cannot be had the test is skipped, unless
`CNSE_REQUIRE_SERVICES=1`, where it fails."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import urllib.request
from typing import Iterator

import pytest

import cnse
from conftest import ROOT, llama_url

PROMPTS = [
    ("The capital of France is", 24),
    ("def fibonacci(n):", 32),
    ("Olá! Je m'appelle", 16),
]


def unavailable(why: str):
    if os.environ.get("CNSE_REQUIRE_SERVICES") == "1":
        pytest.fail(f"llama-server required (CNSE_REQUIRE_SERVICES=1): {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def llama() -> Iterator[str]:
    url = llama_url()
    if url:
        yield url
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = str(ROOT / "scripts/llama-server.sh")
    out = subprocess.run([script, "start", port], capture_output=True, text=True)
    if out.returncode != 0:
        unavailable(f"scripts/llama-server.sh start failed: {out.stderr.strip()[-500:]}")
    try:
        yield out.stdout.strip()
    finally:
        subprocess.run([script, "stop", port], capture_output=True)


def direct_answer(url: str, prompt: str, n: int) -> str:
    """llama-server's own answer to a plain greedy request."""
    body = json.dumps({"prompt": prompt, "n_predict": n, "temperature": 0.0}).encode()
    req = urllib.request.Request(url + "/completion", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)["content"]


def test_issue16_llama_greedy_text_through_the_sdk_equals_llama_servers(serve, llama):
    gw = serve("--backend", "llama", "--llama-url", llama, "--threads", "2")
    with cnse.Client(gw.addr, timeout=120) as c:
        for prompt, n in PROMPTS:
            want = direct_answer(llama, prompt, n)
            assert want
            got = c.generate(prompt, max_tokens=n, temperature=0.0)
            assert got == want, prompt
            assert 1 <= got.tokens <= n
            if got.tokens == n:
                assert got.reason == cnse.FinishReason.LENGTH
            s = c.stream(prompt, max_tokens=n, temperature=0.0, window=2)
            assert "".join(s) == want, prompt

    async def main():
        async with cnse.AsyncClient(gw.addr, timeout=120) as ac:
            return await asyncio.gather(*[ac.generate(p, max_tokens=n) for p, n in PROMPTS])

    for (prompt, n), got in zip(PROMPTS, asyncio.run(main())):
        assert got == direct_answer(llama, prompt, n), prompt
