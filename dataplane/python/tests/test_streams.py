"""Many streams on one connection, cancel, overload."""

import asyncio
import threading
import time

import pytest

import cnse
from conftest import paced


def test_issue16_100_concurrent_async_streams_on_one_connection(serve):
    # 50 tokens at 10 ms: each stream lasts about half a second, so all 100
    # are open at once unless something serialises them.
    s = serve(*paced(1000, 10_000), "--streams-per-conn-max", "256")
    n, max_tokens = 100, 50

    async def main():
        async with cnse.AsyncClient(s.addr) as c:
            first = [None] * n
            ended = [None] * n

            async def one(i):
                st = c.stream(f"prompt {i}", max_tokens=max_tokens, seed=i)
                parts = []
                async for p in st:
                    if first[i] is None:
                        first[i] = time.monotonic()
                    parts.append(p)
                ended[i] = time.monotonic()
                return "".join(parts), st.result

            out = await asyncio.gather(*[one(i) for i in range(n)])
            return out, first, ended

    t0 = time.monotonic()
    out, first, ended = asyncio.run(main())
    wall = time.monotonic() - t0
    # Every stream was open at the moment the last one got its first token.
    assert max(first) < min(ended)
    # Concurrent, not one after another (100 × 0.5 s).
    assert wall < 10
    # The synthetic text depends on (prompt, seed) only, not on the pace:
    # the references come from a zero-delay server.
    fast = serve(*paced(0, 0))
    with cnse.Client(fast.addr) as c:
        for i, (text, result) in enumerate(out):
            assert result.reason == cnse.FinishReason.LENGTH and result.tokens == max_tokens
            assert text == result == c.generate(f"prompt {i}", max_tokens=max_tokens, seed=i)


def test_issue16_threads_share_one_blocking_client(server):
    with cnse.Client(server.addr) as c:
        want = {i: c.generate(f"t{i}", max_tokens=30, seed=i) for i in range(8)}
        got = {}

        def run(i):
            got[i] = "".join(c.stream(f"t{i}", max_tokens=30, seed=i))

        ts = [threading.Thread(target=run, args=(i,)) for i in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert got == want


def test_issue16_cancel_ends_with_reason_2(serve):
    s = serve(*paced(1000, 5000))
    with cnse.Client(s.addr) as c:
        st = c.stream("long", max_tokens=2000)
        seen = 0
        for _ in st:
            seen += 1
            if seen == 3:
                st.cancel()
        r = st.result
        assert r.reason == cnse.FinishReason.CANCELLED == 2
        assert 3 <= r.tokens < 2000
        assert st.tokens == r.tokens
        # The connection goes on.
        assert c.generate("after", max_tokens=2).tokens == 2


def test_issue16_async_cancel_ends_with_reason_2(serve):
    s = serve(*paced(1000, 5000))

    async def main():
        async with cnse.AsyncClient(s.addr) as c:
            st = c.stream("long", max_tokens=2000)
            n = 0
            async for _ in st:
                n += 1
                if n == 2:
                    st.cancel()
            return st.result

    r = asyncio.run(main())
    assert r.reason == cnse.FinishReason.CANCELLED and r.tokens < 2000


def test_issue16_breaking_out_cancels_the_stream_at_the_server(serve):
    s = serve(*paced(1000, 5000), "--streams-per-conn-max", "2")
    with cnse.Client(s.addr) as c:
        for _ in range(5):
            st = c.stream("long", max_tokens=2000)
            next(iter(st))
            del st  # dropped mid-stream: CANCEL, the server frees the slot
        # With two stream slots, five dropped streams did not leak any.
        assert c.generate("x", max_tokens=2).tokens == 2


def test_issue16_overload_raises_429(serve):
    s = serve(*paced(1000, 5000), "--streams-per-conn-max", "2")
    with cnse.Client(s.addr) as c:
        a = c.stream("a", max_tokens=1000)
        b = c.stream("b", max_tokens=1000)
        next(a), next(b)
        with pytest.raises(cnse.ServerError) as e:
            c.generate("c", max_tokens=5)
        assert e.value.code == 429


def test_issue16_async_task_cancellation_cancels_the_request(serve):
    s = serve(*paced(1000, 5000), "--streams-per-conn-max", "1")

    async def main():
        async with cnse.AsyncClient(s.addr) as c:
            task = asyncio.ensure_future(c.generate("slow", max_tokens=2000))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # The single stream slot is free again.
            return await c.generate("next", max_tokens=3)

    assert asyncio.run(main()).tokens == 3


def test_issue16_waiting_releases_the_gil(serve):
    # While one thread waits in generate() (0.4 s of paced tokens), another
    # Python thread keeps running.
    s = serve(*paced(1000, 20_000))
    with cnse.Client(s.addr) as c:
        stop = threading.Event()
        spins = [0]

        def spin():
            while not stop.is_set():
                spins[0] += 1

        t = threading.Thread(target=spin)
        t.start()
        try:
            t0 = time.monotonic()
            assert c.generate("gil", max_tokens=20).tokens == 20
            waited = time.monotonic() - t0
        finally:
            stop.set()
            t.join()
        assert waited > 0.3
        # A thread that held the GIL all along would leave the spinner
        # a few switch intervals (5 ms each) at most.
        assert spins[0] > 100_000, spins[0]


def test_issue16_ctrl_c_interrupts_a_blocking_wait(serve):
    import _thread

    s = serve(*paced(1000, 50_000), "--streams-per-conn-max", "1")
    with cnse.Client(s.addr, timeout=None) as c:
        threading.Timer(0.2, _thread.interrupt_main).start()
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            c.generate("slow", max_tokens=1000)
        assert time.monotonic() - t0 < 2
        # The interrupted request was cancelled: the one stream slot is free.
        assert c.generate("next", max_tokens=2).tokens == 2


def test_issue16_async_client_dropped_without_close_frees_its_connection(serve):
    import gc

    s = serve("--max-connections", "1")

    async def main():
        c = cnse.AsyncClient(s.addr)
        # Several tasks may wait for the handshake at once.
        await asyncio.gather(c.connect(), c.connect(), c.connect())
        assert (await c.generate("one", max_tokens=2)).tokens == 2
        del c
        gc.collect()
        # The only connection slot comes free once the server sees the close.
        deadline = time.monotonic() + 5
        while True:
            try:
                async with cnse.AsyncClient(s.addr) as c2:
                    return await c2.generate("two", max_tokens=2)
            except (cnse.ConnectionLost, cnse.ConnectError):
                assert time.monotonic() < deadline, "the dropped client's connection stayed open"
                await asyncio.sleep(0.05)

    assert asyncio.run(main()).tokens == 2
