"""generate and stream give exactly what `cnse-dp client` prints for the
same (prompt, seed, sampling), blocking and async."""

import asyncio

import pytest

import cnse

CASES = [
    ("Write a haiku about the sea.", 32, 0, 0.0),
    ("Olá! 世界 🦀", 48, 7, 0.0),
    ("Once upon a time", 64, 123456789, 0.8),
    ("x", 1, 1, 0.0),
]


@pytest.mark.parametrize("prompt,max_tokens,seed,temperature", CASES)
def test_issue16_generate_and_stream_equal_the_cli(server, prompt, max_tokens, seed, temperature):
    want = server.client_cli(
        prompt, "--max-tokens", str(max_tokens), "--seed", str(seed), "--temperature", str(temperature)
    )
    assert want
    with cnse.Client(server.addr) as c:
        got = c.generate(prompt, max_tokens=max_tokens, seed=seed, temperature=temperature)
        assert got == want
        assert isinstance(got, str) and got.text == want
        assert got.reason == cnse.FinishReason.LENGTH == 0
        assert got.tokens == max_tokens
        assert 0 < got.ttft_us <= got.total_us
        # The SDK asks for failover marks; the synthetic backend never fails over.
        assert got.failed_over is False

        s = c.stream(prompt, max_tokens=max_tokens, seed=seed, temperature=temperature)
        pieces = list(s)
        # A stream keeps its connection alive: no client variable needed.
        kept = cnse.Client(server.addr).stream(prompt, max_tokens=max_tokens, seed=seed, temperature=temperature)
        assert "".join(kept) == want
        assert all(isinstance(p, str) and p for p in pieces)
        assert "".join(pieces) == want
        assert s.result == want and s.result.reason == cnse.FinishReason.LENGTH
        assert s.result.tokens == s.tokens == max_tokens


def test_issue16_async_generate_and_stream_equal_the_cli(server):
    prompt, n, seed = "The capital of France is", 40, 42
    want = server.client_cli(prompt, "--max-tokens", str(n), "--seed", str(seed))

    async def main():
        async with cnse.AsyncClient(server.addr) as c:
            got = await c.generate(prompt, max_tokens=n, seed=seed)
            s = c.stream(prompt, max_tokens=n, seed=seed)
            pieces = [p async for p in s]
            return got, pieces, s.result

    got, pieces, result = asyncio.run(main())
    assert got == want and got.tokens == n
    assert "".join(pieces) == want
    assert result == want and result.reason == cnse.FinishReason.LENGTH and result.tokens == n


@pytest.mark.parametrize("window", [1, 2, 7, 65536])
def test_issue16_any_credit_window_gives_the_same_text(server, window):
    want = server.client_cli("credit", "--max-tokens", "50", "--seed", "5")
    with cnse.Client(server.addr, window=window) as c:
        assert c.generate("credit", max_tokens=50, seed=5) == want
        s = c.stream("credit", max_tokens=50, seed=5)
        assert "".join(s) == want
        assert s.result.tokens == 50


def test_issue16_ping_and_server_facts(server):
    with cnse.Client(server.addr) as c:
        assert c.server.startswith("cnse-dp")
        assert c.payload_bytes_max == 1 << 20
        rtt = c.ping()
        assert 0 < rtt < 5

    async def main():
        c = cnse.AsyncClient(server.addr)
        try:
            rtts = await asyncio.gather(*[c.ping() for _ in range(20)])
            return rtts, c.server
        finally:
            await c.close()

    rtts, _ = asyncio.run(main())
    assert all(0 < r < 5 for r in rtts)


def test_issue16_bad_parameters_raise_400_and_the_connection_goes_on(server):
    with cnse.Client(server.addr) as c:
        with pytest.raises(cnse.ServerError) as e:
            c.generate("hi", top_p=0.0)
        assert e.value.code == 400 and e.value.stream_id > 0
        with pytest.raises(cnse.ServerError) as e:
            list(c.stream("hi", max_tokens=0))
        assert e.value.code == 400
        with pytest.raises(OverflowError):
            c.generate("hi", max_tokens=-1)
        with pytest.raises(ValueError):
            c.generate("hi", window=0)
        assert c.generate("still fine", max_tokens=3).tokens == 3


def test_issue16_prompt_over_the_payload_limit_is_refused_with_413_before_sending(serve):
    s = serve("--payload-max-bytes", "4096")
    with cnse.Client(s.addr) as c:
        with pytest.raises(cnse.Error) as e:
            c.generate("x" * 5000)
        assert e.value.code == 413
        # Nothing reached the server: the connection is still good.
        assert c.generate("short", max_tokens=2).tokens == 2


def test_issue16_long_prompt_equals_the_cli(server):
    # 100 KB: sent with the GIL released; the text matches the CLI's.
    prompt = "Olá " * 25_000 + "end"
    want = server.client_cli(prompt, "--max-tokens", "8", "--seed", "9")
    with cnse.Client(server.addr) as c:
        assert c.generate(prompt, max_tokens=8, seed=9) == want
        assert "".join(c.stream(prompt, max_tokens=8, seed=9)) == want


def test_issue14_a_session_key_is_sent_and_a_bad_one_refused(server):
    """The synthetic backend ignores the key: same text with and without;
    a key that is not 1-256 visible ASCII characters is refused before
    anything is sent, and the connection goes on."""
    with cnse.Client(server.addr) as c:
        plain = c.generate("Once upon a time", max_tokens=8)
        keyed = c.generate("Once upon a time", max_tokens=8, session="user-7:conv-1")
        assert keyed == plain and keyed.tokens == 8
        assert "".join(c.stream("Once upon a time", max_tokens=8, session="conv-2")) == plain
        for bad in ["", "two words", "k" * 257, "café"]:
            with pytest.raises(ValueError):
                c.generate("x", max_tokens=2, session=bad)
        assert c.generate("x", max_tokens=2, session="k" * 256).tokens == 2

    async def main():
        async with cnse.AsyncClient(server.addr) as a:
            return await a.generate("Once upon a time", max_tokens=8, session="conv-3")

    assert asyncio.run(main()) == plain
