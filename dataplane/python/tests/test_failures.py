"""Auth, a server that dies mid-stream, timeouts: exceptions, never a hang."""

import asyncio
import socket
import threading
import time

import pytest

import cnse
from conftest import paced


@pytest.fixture
def keyed(serve, tmp_path):
    key = tmp_path / "key.txt"
    key.write_text("s3cret\n")
    key.chmod(0o600)  # only the owner may read a key file (issue 11)
    return serve("--auth-key-file", str(key))


def test_issue16_bad_auth_raises_401(keyed):
    for bad in ["wrong", None, b"s3cret\n"]:
        with pytest.raises(cnse.ServerError) as e:
            cnse.Client(keyed.addr, auth_key=bad)
        assert e.value.code == 401
    with cnse.Client(keyed.addr, auth_key="s3cret") as c:
        assert c.generate("ok", max_tokens=2).tokens == 2


def test_issue16_async_bad_auth_raises_401(keyed):
    async def main():
        with pytest.raises(cnse.ServerError) as e:
            async with cnse.AsyncClient(keyed.addr, auth_key="wrong"):
                pass
        assert e.value.code == 401
        # Without connect(): the first call raises it.
        c = cnse.AsyncClient(keyed.addr, auth_key="wrong")
        with pytest.raises(cnse.ServerError) as e:
            await c.generate("x")
        assert e.value.code == 401
        async with cnse.AsyncClient(keyed.addr, auth_key=b"s3cret") as c:
            return await c.generate("ok", max_tokens=2)

    assert asyncio.run(main()).tokens == 2


def test_issue16_server_gone_mid_stream_raises_not_hangs(serve):
    s = serve(*paced(1000, 5000))
    c = cnse.Client(s.addr, timeout=None)  # no timeout: only the close can end it
    st = c.stream("long", max_tokens=5000)
    next(st)
    s.kill()
    t0 = time.monotonic()
    with pytest.raises(cnse.ConnectionLost):
        for _ in st:
            pass
    assert time.monotonic() - t0 < 5
    assert c.closed
    with pytest.raises(cnse.ConnectionLost):
        c.generate("again")
    with pytest.raises(ConnectionError):  # the builtin base works too
        c.ping()


def test_issue16_server_gone_during_generate_and_async_raises(serve):
    s = serve(*paced(1000, 5000))
    c = cnse.Client(s.addr, timeout=None)
    threading.Timer(0.2, s.kill).start()
    with pytest.raises(cnse.ConnectionLost):
        c.generate("long", max_tokens=5000)

    s2 = serve(*paced(1000, 5000))

    async def main():
        async with cnse.AsyncClient(s2.addr, timeout=None) as ac:
            streams = [ac.stream(f"p{i}", max_tokens=5000) for i in range(10)]
            await streams[0].__anext__()
            s2.kill()

            async def drain(st):
                async for _ in st:
                    pass

            results = await asyncio.gather(*[drain(st) for st in streams], return_exceptions=True)
            return results

    results = asyncio.run(asyncio.wait_for(main(), 10))
    assert all(isinstance(r, cnse.ConnectionLost) for r in results), results


def test_issue16_silent_server_times_out():
    # A listener that accepts and answers nothing: the handshake times out.
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4)
    addr = "127.0.0.1:%d" % lsock.getsockname()[1]
    try:
        t0 = time.monotonic()
        with pytest.raises(cnse.Timeout):
            cnse.Client(addr, connect_timeout=0.5)
        assert time.monotonic() - t0 < 3
    finally:
        lsock.close()


def test_issue16_stalled_stream_times_out_and_is_cancelled(serve):
    # Tokens every 2 s and a 0.5 s timeout: the waiting stream gives up.
    s = serve(*paced(2_000_000, 2_000_000))
    with cnse.Client(s.addr, timeout=0.5) as c:
        t0 = time.monotonic()
        with pytest.raises(cnse.Timeout):
            list(c.stream("slow", max_tokens=3))
        assert time.monotonic() - t0 < 2
        assert c.ping() > 0  # the connection is fine


def test_issue16_connect_refused():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(cnse.ConnectError):
        cnse.Client(f"127.0.0.1:{port}")


def test_issue16_closed_client_raises(server):
    c = cnse.Client(server.addr)
    st = c.stream("x", max_tokens=10_000)
    c.close()
    with pytest.raises(cnse.ClientClosed):
        list(st)
    with pytest.raises(cnse.ClientClosed):
        c.generate("x")


def test_issue16_server_shutdown_raises_503_on_open_streams(serve):
    s = serve(*paced(1000, 5000), "--shutdown-grace-ms", "100")
    with cnse.Client(s.addr, timeout=None) as c:
        st = c.stream("long", max_tokens=5000)
        next(st)
        s.proc.terminate()  # SIGTERM: grace, then ERROR 503 on open streams
        with pytest.raises(cnse.ServerError) as e:
            for _ in st:
                pass
        assert e.value.code == 503 and e.value.stream_id == st.id
        assert st.tokens > 0
