"""`graft serve` driven by the official `openai` Python SDK (run by scripts/test_serve.sh, which
starts the server and sets GRAFT_SERVE_URL, GRAFT_API_KEY, GRAFT_BIN, GRAFT_FIXTURE)."""

import concurrent.futures
import os
import subprocess

import json
import urllib.error
import urllib.request
import openai
import pytest

URL = os.environ["GRAFT_SERVE_URL"]
KEY = os.environ["GRAFT_API_KEY"]
BIN = os.environ["GRAFT_BIN"]
FIXTURE = os.environ["GRAFT_FIXTURE"]
BASE = "stories260k"
PROMPT = "Once upon a time, there was a little"


@pytest.fixture(scope="module")
def client():
    return openai.OpenAI(base_url=URL + "/v1", api_key=KEY, max_retries=0, timeout=120)


def http(method, path, body=None):
    """(status, parsed JSON body) of a raw request with the API key."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(URL + path, data=data, method=method, headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def complete(client, model, prompt=PROMPT, max_tokens=24):
    r = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    return r.choices[0].text


def test_models_list(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == BASE
    assert {"a", "b"} <= set(ids)
    for path in ("/v1/models", "/v1/adapters", "/v1/models/a"):
        status, body = http("GET", path)
        assert status == 200
        assert FIXTURE not in json.dumps(body), f"a server path in {path}: {body}"
    assert all(m["root"] == BASE for m in http("GET", "/v1/models")[1]["data"])


def test_chat_non_stream_and_stream(client):
    messages = [{"role": "user", "content": "Tell me a story about a cat."}]
    r = client.chat.completions.create(model=BASE, messages=messages, max_tokens=20, temperature=0)
    assert r.object == "chat.completion"
    text = r.choices[0].message.content
    assert r.choices[0].message.role == "assistant"
    assert text
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 20
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    stream = client.chat.completions.create(
        model=BASE, messages=messages, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    assert "".join(pieces) == text
    assert finish == r.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == r.usage.completion_tokens


def test_completions_non_stream_and_stream(client):
    text = complete(client, "a")
    stream = client.completions.create(model="a", prompt=PROMPT, max_tokens=24, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == text


def test_two_adapters_and_base_concurrently(client):
    # Enough concurrent requests that decode steps batch more rows than the few-row products
    # take: a greedy output must not depend on what else the server is running.
    models = [BASE, "a", "b"]
    prompts = [PROMPT, "Lily was", "The big dog"]
    expected = {(m, p): complete(client, m, prompt=p) for m in models for p in prompts}
    assert len({expected[(m, PROMPT)] for m in models}) == 3, "adapters change the output"
    jobs = list(expected) * 2
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda j: (j, complete(client, j[0], prompt=j[1])), jobs))
    for job, text in results:
        assert text == expected[job], job


def generate(*args):
    out = subprocess.run([BIN, "generate", "--model", os.path.join(FIXTURE, "model"), *args],
                         check=True, capture_output=True, text=True).stdout
    return out[:-1] if out.endswith("\n") else out


@pytest.mark.parametrize("adapter", [None, "a", "b"])
def test_greedy_equals_graft_generate(client, adapter):
    args = ["--prompt", PROMPT, "--max-tokens", "24"]
    if adapter:
        args += ["--adapter", os.path.join(FIXTURE, "adapters", adapter)]
    assert complete(client, adapter or BASE) == generate(*args)


def test_chat_equals_graft_generate_chat(client):
    msg = "Where did the dog go?"
    r = client.chat.completions.create(model="b", messages=[{"role": "user", "content": msg}],
                                       max_tokens=24, temperature=0)
    want = generate("--chat", "--prompt", msg, "--max-tokens", "24",
                    "--adapter", os.path.join(FIXTURE, "adapters", "b"))
    assert r.choices[0].message.content == want


def test_sampling_n_seed_stop(client):
    kw = dict(model="a", prompt="Lily", max_tokens=12, temperature=1.0, seed=3, n=2)
    r1 = client.completions.create(**kw)
    r2 = client.completions.create(**kw)
    assert len(r1.choices) == 2
    assert [c.text for c in r1.choices] == [c.text for c in r2.choices]
    full = complete(client, BASE, max_tokens=20)
    word = full.split()[2]
    r = client.completions.create(model=BASE, prompt=PROMPT, max_tokens=20, temperature=0, stop=[word])
    assert r.choices[0].text == full[: full.index(word)]
    assert r.choices[0].finish_reason == "stop"


def test_errors(client):
    with pytest.raises(openai.NotFoundError):
        complete(client, "no-such-adapter")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "x"}], temperature=5)
    assert e.value.body["param"] == "temperature"
    bad = openai.OpenAI(base_url=URL + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_hot_load_and_unload(client):
    status, body = http("POST", "/v1/adapters", {"name": "c", "path": os.path.join(FIXTURE, "spare", "c")})
    assert status == 200, body
    assert "c" in [m.id for m in client.models.list().data]
    assert complete(client, "c") != complete(client, BASE)
    status, body = http("POST", "/v1/adapters", {"name": "x", "path": "/etc"})
    assert status == 403, body
    # A path that does not exist is answered like one outside the roots.
    status2, body2 = http("POST", "/v1/adapters", {"name": "x", "path": "/nonexistent"})
    assert status2 == 403, body2
    assert body2["error"]["message"].replace("/nonexistent", "/etc") == body["error"]["message"]
    assert http("DELETE", "/v1/adapters/c")[0] == 200
    with pytest.raises(openai.NotFoundError):
        complete(client, "c")


def test_n_streaming_logprobs_and_retrieve(client):
    stream = client.chat.completions.create(
        model="a", messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
        temperature=0.8, seed=1, n=2, stream=True)
    texts, finished = {0: "", 1: ""}, set()
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1}
    r = client.chat.completions.create(
        model=BASE, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
        temperature=0, logprobs=True, top_logprobs=3)
    lp = r.choices[0].logprobs.content
    assert len(lp) == r.usage.completion_tokens
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 3 for t in lp)
    r = client.completions.create(model="b", prompt=["Tom", "Sue"], max_tokens=4, temperature=0)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert client.models.retrieve("b").id == "b"


def test_tool_choice_required_is_refused(client):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "hi"}]
    for choice in ("required", {"type": "function", "function": {"name": "f"}}):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=BASE, messages=messages, tools=tools,
                                           tool_choice=choice, max_tokens=2)
        assert e.value.body["param"] == "tool_choice"
    r = client.chat.completions.create(model=BASE, messages=messages, tools=tools,
                                       tool_choice="none", max_tokens=2)
    assert r.choices[0].message.tool_calls in (None, [])


def test_sigterm_drains_then_cuts_open_streams_and_exits_non_zero():
    """A second server: SIGTERM with a stream open past --shutdown-grace ends the stream with an
    error event (the SDK raises), new requests get 503, and graft exits non-zero."""
    import signal
    import socket
    import time
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    proc = subprocess.Popen(
        [BIN, "serve", "--model", os.path.join(FIXTURE, "model"), "--served-model-name", "drain",
         "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "16384",
         "--shutdown-grace", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                time.sleep(0.1)
        c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        stream = c.completions.create(model="drain", prompt="Once", max_tokens=16000, stream=True,
                                      temperature=0, extra_body={"ignore_eos": True})
        it = iter(stream)
        next(it)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(openai.APIStatusError) as e:
            c.completions.create(model="drain", prompt="x", max_tokens=2)
        assert e.value.status_code == 503
        with pytest.raises(openai.APIError) as e:
            for _ in it:
                pass
        assert "shut down" in str(e.value)
        assert proc.wait(timeout=30) != 0
        assert "still open" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_messages_too_many_sequences_and_wrong_method(client):
    for messages, param in [
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "user", "content": "hi"}, {"role": "wizard", "content": "x"}], "messages[1].role"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=BASE, messages=messages, max_tokens=2)
        assert e.value.body["param"] == param
    # 3 prompts × n = 128 can never fit 32 running + 256 waiting: a 400, not a retryable 429.
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=BASE, prompt=["a", "b", "c"], n=128, max_tokens=1)
    assert e.value.body["param"] == "n"
    status, body = http("GET", "/v1/chat/completions")
    assert status == 405 and "POST" in body["error"]["message"]
