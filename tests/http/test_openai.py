"""Issue 12: the HTTP front against clients nobody here wrote: the official
`openai` package, `curl -N`, and `prometheus_client`'s exposition parser.
Run by scripts/test-http.sh (a venv with those packages, the real binary)."""

import os
import subprocess
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

BIN = os.environ.get("CNSE_DP_BIN", "target/release/cnse-dp")


def start(*extra):
    p = subprocess.Popen(
        [BIN, "serve", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--threads", "1", "--no-pin", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    for _ in range(4):
        line = p.stdout.readline()
        if line.startswith("http listening on "):
            return p, "http://" + line.split()[-1]
    p.kill()
    raise RuntimeError("cnse-dp printed no `http listening on` line")


@pytest.fixture(scope="module")
def server():
    p, base = start("--synthetic-ttft-us", "0", "--synthetic-token-interval-us", "0")
    yield base
    p.terminate()
    p.wait(timeout=10)


def client(base, key="unused"):
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)


def test_completions_whole_and_streamed_are_the_same_text(server):
    c = client(server)
    whole = c.completions.create(model="cnse-synthetic", prompt="Tell me a story", max_tokens=12, temperature=0, seed=9)
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 12
    text = "".join(
        ch.choices[0].text
        for ch in c.completions.create(model="cnse-synthetic", prompt="Tell me a story", max_tokens=12,
                                       temperature=0, seed=9, stream=True)
        if ch.choices
    )
    assert text == whole.choices[0].text != ""


def test_chat_whole_and_streamed_with_usage(server):
    c = client(server)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    whole = c.chat.completions.create(model="cnse-synthetic", messages=msgs, max_tokens=8, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    parts, usage, roles = [], None, []
    for ch in c.chat.completions.create(model="cnse-synthetic", messages=msgs, max_tokens=8, temperature=0,
                                        stream=True, stream_options={"include_usage": True}):
        if ch.usage:
            usage = ch.usage
        for choice in ch.choices:
            if choice.delta.role:
                roles.append(choice.delta.role)
            if choice.delta.content:
                parts.append(choice.delta.content)
    assert "".join(parts) == whole.choices[0].message.content
    assert roles == ["assistant"]
    assert usage.completion_tokens == 8 and usage.total_tokens == usage.prompt_tokens + 8


def test_stop_sequence_cuts_the_text(server):
    c = client(server)
    full = c.completions.create(model="m", prompt="abc", max_tokens=10, temperature=0, seed=1).choices[0].text
    stop = full.split()[3]
    for stream in (False, True):
        if stream:
            text = "".join(ch.choices[0].text for ch in c.completions.create(
                model="m", prompt="abc", max_tokens=10, temperature=0, seed=1, stop=[stop], stream=True) if ch.choices)
        else:
            r = c.completions.create(model="m", prompt="abc", max_tokens=10, temperature=0, seed=1, stop=stop)
            assert r.choices[0].finish_reason == "stop"
            text = r.choices[0].text
        assert text == full[: full.index(stop)], (stream, text, full, stop)


def test_models_and_errors(server):
    c = client(server)
    assert [m.id for m in c.models.list()] == ["cnse-synthetic"]
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="m", prompt="x", max_tokens=0)
    assert "max_tokens" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="m", prompt="x", n=2)
    with pytest.raises(openai.NotFoundError):
        c.embeddings.create(model="m", input="x")


def test_a_wrong_key_is_refused(tmp_path):
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    key.chmod(0o600)  # only the owner may read a key file (issue 11)
    p, base = start("--auth-key-file", str(key))
    try:
        with pytest.raises(openai.AuthenticationError):
            client(base, "wrong").models.list()
        assert [m.id for m in client(base, "s3cret").models.list()] == ["cnse-synthetic"]
    finally:
        p.terminate()
        p.wait(timeout=10)


def test_curl_streams_server_sent_events(server):
    out = subprocess.run(
        ["curl", "-sN", "--max-time", "10", server + "/v1/completions", "-H", "Content-Type: application/json",
         "-d", '{"prompt":"hello","max_tokens":5,"stream":true}'],
        check=True, capture_output=True, text=True,
    ).stdout
    events = [e[len("data: "):] for e in out.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    import json
    last = json.loads(events[-2])
    assert last["choices"][0]["finish_reason"] == "length"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) != ""


def test_metrics_parse_as_prometheus_text(server):
    client(server).completions.create(model="m", prompt="x", max_tokens=3)
    text = urllib.request.urlopen(server + "/metrics", timeout=10).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    ok = [s.value for s in families["cnse_requests"].samples
          if s.labels == {"protocol": "http", "outcome": "ok"}]
    assert ok and ok[0] >= 1
    assert families["cnse_ttft_seconds"].type == "histogram"
    assert families["cnse_tokens_sent"].samples[0].value >= 3
    assert families["cnse_connections_open"].type == "gauge"
    run = {s.labels["core"]: s.value for s in families["cnse_requests_run"].samples}
    assert set(run) == {"local", "stolen"} and run["local"] + run["stolen"] >= 1


LLAMA = os.environ.get("CNSE_LLAMA_URL")
llama_only = pytest.mark.skipif(
    not LLAMA and os.environ.get("CNSE_REQUIRE_SERVICES") != "1",
    reason="CNSE_LLAMA_URL not set (scripts/test.sh starts a llama-server)",
)


@pytest.fixture(scope="module")
def llama_front():
    assert LLAMA, "CNSE_REQUIRE_SERVICES=1 but no CNSE_LLAMA_URL"
    p, base = start("--backend", "llama", "--llama-url", LLAMA)
    yield base
    p.terminate()
    p.wait(timeout=10)


@llama_only
def test_llama_text_equals_llama_servers_own_at_temperature_0(llama_front):
    ours, theirs = client(llama_front), client(LLAMA)
    model = ours.models.list().data[0].id
    assert model == theirs.models.list().data[0].id
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    a = ours.chat.completions.create(model=model, messages=msgs, max_tokens=16, temperature=0)
    b = theirs.chat.completions.create(model=model, messages=msgs, max_tokens=16, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content != ""
    streamed = "".join(
        ch.choices[0].delta.content or ""
        for ch in ours.chat.completions.create(model=model, messages=msgs, max_tokens=16, temperature=0, stream=True)
        if ch.choices
    )
    assert streamed == b.choices[0].message.content
    a = ours.completions.create(model=model, prompt="The capital of France is", max_tokens=12, temperature=0)
    b = theirs.completions.create(model=model, prompt="The capital of France is", max_tokens=12, temperature=0)
    assert a.choices[0].text == b.choices[0].text != ""


@llama_only
def test_llama_usage_is_llama_servers_own_count(llama_front):
    ours, theirs = client(llama_front), client(LLAMA)
    model = ours.models.list().data[0].id
    prompt = "Write a haiku about the sea, please."
    a = ours.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0)
    b = theirs.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0)
    assert a.usage.prompt_tokens == b.usage.prompt_tokens > 0
    assert a.usage.completion_tokens == b.usage.completion_tokens > 0
    last = [ch for ch in ours.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0, stream=True,
                                                 stream_options={"include_usage": True})][-1]
    assert last.usage.prompt_tokens == b.usage.prompt_tokens
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    a = ours.chat.completions.create(model=model, messages=msgs, max_tokens=4, temperature=0)
    b = theirs.chat.completions.create(model=model, messages=msgs, max_tokens=4, temperature=0)
    assert a.usage.prompt_tokens == b.usage.prompt_tokens > 0


@llama_only
def test_a_disconnecting_client_frees_its_llama_slot(llama_front):
    import json
    import socket
    import time

    def processing():
        return sum(bool(s.get("is_processing")) for s in json.load(urllib.request.urlopen(LLAMA + "/slots", timeout=10)))

    host, port = llama_front[len("http://"):].split(":")
    body = json.dumps({"prompt": "Count slowly:", "max_tokens": 4000, "temperature": 0, "stream": True}).encode()
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    assert b"200 OK" in s.recv(4096)
    deadline = time.time() + 10
    while processing() == 0 and time.time() < deadline:
        time.sleep(0.05)
    assert processing() == 1
    s.close()
    deadline = time.time() + 10
    while processing() != 0 and time.time() < deadline:
        time.sleep(0.05)
    assert processing() == 0, "the slot is free once the client is gone"
