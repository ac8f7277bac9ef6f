"""The server with real parts: the official `openai` client against a live local server, step-level
batching against requests served alone, capacity and cancellation, and the page driven in headless
Chromium (Debian's, through Playwright)."""

from __future__ import annotations

import gc
import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest
import torch
import uvicorn
from conftest import save_tiny_model, tiny_config
from torch import nn

from remask.checkpoint.storage import save_model
from remask.model import KV, build_model
from remask.pipeline import Pipeline
from remask.sampling import SamplerConfig
from remask.serve.app import create_app

CHROMIUM = Path("/usr/bin/chromium")
SCRIPT = "床前明月光，疑是地上霜。举头望明月，低头思故乡。白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"


class KnownAnswer(nn.Module):
    """Whatever the input, position p predicts script[p] with certainty (then end-of-text): the
    answer to a prompt of length P is script[P:]. Optionally slow, to watch the page animate."""

    def __init__(self, tokenizer, script: str, *, delay: float = 0.0) -> None:
        super().__init__()
        self.script = [tokenizer.bos_id, *tokenizer.encode(script)]
        self.eos, self.delay, self.calls = tokenizer.eos_id, delay, 0
        self.config = SimpleNamespace(causal=False, max_sequence_length=96, vocab_size=tokenizer.vocab_size)
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, ids, attention_mask=None, positions=None, *, past=None, return_kv=False, logits_at=None):
        self.calls += 1
        time.sleep(self.delay)
        B, T = ids.shape
        if positions is None:
            positions = torch.arange(T)
        positions = positions.expand(B, T) if positions.dim() == 1 else positions
        wanted = torch.tensor([[self.script[p] if p < len(self.script) else self.eos for p in row]
                               for row in positions.tolist()])
        logits = torch.full((B, T, self.config.vocab_size), -10.0).scatter_(-1, wanted[..., None], 10.0)
        if isinstance(logits_at, torch.Tensor) and logits_at.dim() == 2:
            logits = logits.gather(1, logits_at[..., None].expand(-1, -1, logits.shape[-1]))
        elif logits_at is not None:
            logits = logits[:, logits_at]
        if not return_kv:
            return logits
        return logits, KV([(torch.zeros(B, 1, T, 1), torch.zeros(B, 1, T, 1))], None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, app) -> None:
        self.app, self.port = app, free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)

    def health(self) -> dict:
        return json.loads(urllib.request.urlopen(f"{self.url}/health", timeout=10).read())

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


SAMPLER = SamplerConfig(gen_length=16, steps=16, block_length=8, cache="dual", parallel="threshold", threshold=0.9)


@pytest.fixture(scope="module")
def real(model_dir):
    """A live server over the tiny random model (answers are gibberish, but deterministic)."""
    server = LiveServer(create_app(Pipeline.load(model_dir), model_name="tiny", sampler=SAMPLER, max_tokens_limit=64))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def known(poem_tokenizer):
    """A live server whose model answers a prompt of P tokens with SCRIPT from its P-th token on."""
    pipe = Pipeline(KnownAnswer(poem_tokenizer, SCRIPT), poem_tokenizer)
    server = LiveServer(create_app(pipe, model_name="known", sampler=SAMPLER, max_tokens_limit=64))
    server.pipe = pipe
    yield server
    server.stop()


def expected_answer(pipe: Pipeline, prompt) -> str:
    ids = [pipe.tokenizer.bos_id, *pipe.tokenizer.encode(SCRIPT)]
    return pipe.tokenizer.decode(ids[len(pipe.encode_prompt(prompt)):])


def test_models_and_health(real):
    assert [m.id for m in real.client().models.list().data] == ["tiny"]
    assert real.health()["status"] == "ok"


def test_completion_and_chat_shapes_with_the_openai_client(known):
    client = known.client()
    done = client.completions.create(model="known", prompt="床前", max_tokens=64)
    assert done.choices[0].text == SCRIPT[2:] and done.choices[0].finish_reason == "stop"
    assert done.usage.completion_tokens == len(SCRIPT) - 2 and done.usage.prompt_tokens == 3
    assert done.object == "text_completion" and done.model == "known"
    cut = client.completions.create(model="known", prompt="床前", max_tokens=3)
    assert cut.choices[0].text == "明月光" and cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 3
    stopped = client.completions.create(model="known", prompt="床前", max_tokens=64, stop=["，", "。"])
    assert stopped.choices[0].text == "明月光" and stopped.choices[0].finish_reason == "stop"
    messages = [{"role": "user", "content": "床前"}]
    chat = client.chat.completions.create(model="known", messages=messages, max_tokens=64)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == expected_answer(known.pipe, messages) != ""
    assert chat.choices[0].finish_reason == "stop"
    assert chat.usage.prompt_tokens == len(known.pipe.encode_prompt(messages))


def test_streaming_text_and_steps(known):
    client = known.client()
    chunks = list(client.completions.create(model="known", prompt="床前", max_tokens=64, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == SCRIPT[2:] and len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # in pieces
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == len(SCRIPT) - 2
    cut = list(client.completions.create(model="known", prompt="床前", max_tokens=64, stream=True, stop="霜"))
    assert "".join(c.choices[0].text for c in cut) == "明月光，疑是地上" and cut[-1].choices[0].finish_reason == "stop"
    steps = list(client.chat.completions.create(model="known", messages=[{"role": "user", "content": "x"}],
                                                max_tokens=8, stream=True, extra_body={"remask_stream": "steps",
                                                                                       "cache": "none",
                                                                                       "parallel": "schedule"}))
    frames = [c.model_extra["remask"] for c in steps if c.model_extra and "remask" in c.model_extra]
    assert len(frames) == 8  # one token per step: every step's partial answer
    assert [sum(t is None for t in f["tokens"]) for f in frames] == list(range(7, -1, -1))
    assert sorted(frames[-1]["reveal_step"]) == list(range(8))  # each position revealed at its own step
    answer = expected_answer(known.pipe, [{"role": "user", "content": "x"}])[:8]
    assert "".join(frames[-1]["tokens"]) == answer and "".join(c.choices[0].delta.content or "" for c in steps) == answer


@pytest.mark.parametrize("body, status, fragment", [
    ({"prompt": "床前", "bogus": 1}, 400, "unknown field 'bogus'"),
    ({"prompt": "床前", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "床前", "temperature": 9}, 400, "temperature"),
    ({"prompt": "床前", "max_tokens": 1000}, 400, "exceeds this server's limit"),
    ({"prompt": "床前", "threshold": 3}, 400, "threshold must be <= 1"),
    ({"prompt": "床前", "remasking": "nope"}, 400, "remasking must be one of"),
    ({"prompt": "床前", "n": 2}, 400, "n=2 is not supported"),
    ({"prompt": "床前", "block_length": 0}, 400, "block_length must be > 0"),
    ({"prompt": "床前", "max_tokens": "8"}, 400, "max_tokens: Input should be a valid integer"),
    ({"prompt": "床前", "max_tokens": True}, 400, "max_tokens: Input should be a valid integer"),
    ({"prompt": "床前", "stream": "yes"}, 400, "stream: Input should be a valid boolean"),
    ({"prompt": "床前", "temperature": "0"}, 400, "temperature: Input should be a valid number"),
    ({"prompt": "床前", "steps": 8.0}, 400, "steps: Input should be a valid integer"),
    ({"prompt": "床前", "model": "other"}, 404, "is not served here"),
    ({"prompt": ["a", "b"]}, 400, "one string"),
])
def test_bad_requests_are_openai_errors_and_the_server_keeps_serving(real, body, status, fragment):
    request = urllib.request.Request(f"{real.url}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=30)
    error = json.loads(info.value.read())["error"]
    assert info.value.code == status and fragment in error["message"] and error["type"]
    assert real.client().completions.create(model="tiny", prompt="床前", max_tokens=4).choices[0].text is not None


def test_malformed_json_and_the_openai_client_errors(real):
    request = urllib.request.Request(f"{real.url}/v1/chat/completions", data=b"{not json",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=30)
    assert info.value.code == 400 and "not valid JSON" in json.loads(info.value.read())["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="unknown field"):
        real.client().completions.create(model="tiny", prompt="x", max_tokens=4, extra_body={"colour": "red"})
    with pytest.raises(openai.NotFoundError):
        real.client().chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])


def test_api_key_is_required_when_set(model_dir):
    server = LiveServer(create_app(Pipeline.load(model_dir), model_name="tiny", sampler=SAMPLER, api_key="s3cret"))
    try:
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key="wrong").models.list()
        assert server.client(api_key="s3cret").models.list().data[0].id == "tiny"
        assert server.health()["status"] == "ok"  # health needs no key
    finally:
        server.stop()


def ask(server, prompt: str, **kw) -> str:
    return server.client().completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0,
                                              **kw).choices[0].text


def test_batched_answers_equal_answers_served_alone(real):
    prompts = ["床前", "白日依山", "春", "千山鸟飞绝", "举头望", "低头思故乡", "黄河", "孤舟"]
    extra = [{}, {"extra_body": {"cache": "none", "parallel": "schedule"}}]
    alone = [ask(real, p, **extra[i % 2]) for i, p in enumerate(prompts)]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda ip: ask(real, ip[1], **extra[ip[0] % 2]), enumerate(prompts)))
    assert together == alone
    assert real.health()["completed"] >= 2 * len(prompts)


def test_a_block_model_is_served_block_by_block_and_batched(poem_tokenizer, tmp_path):
    """A block diffusion model takes the engine's exact-cache block path from its own config: answers
    batched with others equal answers alone and the pipeline's; a stream's deltas arrive as its blocks
    settle and add up to the answer."""
    directory = save_tiny_model(tmp_path / "bd", poem_tokenizer, attention="block", block_length=4)
    pipe = Pipeline.load(directory)
    server = LiveServer(create_app(pipe, model_name="tiny", sampler=SamplerConfig(gen_length=16, steps=16),
                                   max_tokens_limit=64))
    try:
        prompts = ["床前", "白日依山", "春", "千山鸟飞绝", "举头望"]
        alone = [ask(server, p) for p in prompts]
        with ThreadPoolExecutor(len(prompts)) as pool:
            assert list(pool.map(lambda p: ask(server, p), prompts)) == alone
        assert alone[0] == pipe.generate("床前", SamplerConfig(gen_length=16, steps=16)).text
        chunks = [c.choices[0].text for c in server.client().completions.create(
            model="tiny", prompt=prompts[1], max_tokens=16, temperature=0, stream=True)]
        assert "".join(chunks) == alone[1] and sum(bool(c) for c in chunks) >= min(2, len(alone[1]) // 4)
    finally:
        server.stop()


def test_an_anchored_answer_ends_within_its_canvas(real):
    """anchor_eos puts an end-of-text at the last of the 16 answer positions: the answer stops there."""
    done = real.client().completions.create(model="tiny", prompt="床前", max_tokens=16, temperature=0,
                                            extra_body={"anchor_eos": True})
    assert done.choices[0].finish_reason == "stop" and done.usage.completion_tokens <= 15
    bad = real.client().with_options(max_retries=0)
    with pytest.raises(openai.BadRequestError, match="anchor_eos"):
        bad.completions.create(model="tiny", prompt="床前", max_tokens=16, extra_body={"anchor_eos": True, "eos": "forbid"})


def test_full_queue_answers_503_with_retry_after(poem_tokenizer):
    slow = Pipeline(KnownAnswer(poem_tokenizer, "床前明月光，疑是地上霜。", delay=0.05), poem_tokenizer)
    server = LiveServer(create_app(slow, model_name="known", sampler=SAMPLER, max_batch=1, max_queue=1))
    try:
        def attempt(_):
            request = urllib.request.Request(f"{server.url}/v1/completions", headers={"Content-Type": "application/json"},
                                             data=json.dumps({"prompt": "床前", "max_tokens": 16,
                                                              "cache": "none", "parallel": "schedule"}).encode())
            try:
                return urllib.request.urlopen(request, timeout=60).status, None
            except urllib.error.HTTPError as e:
                return e.code, e.headers.get("Retry-After")

        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(attempt, range(6)))
        assert (200, None) in results and (503, "1") in results
        assert server.client().completions.create(model="known", prompt="床前", max_tokens=4).choices[0].text == "明月光，"
    finally:
        server.stop()


def test_a_client_that_goes_away_stops_its_work(poem_tokenizer):
    slow = Pipeline(KnownAnswer(poem_tokenizer, "床前明月光，疑是地上霜。" * 4, delay=0.05), poem_tokenizer)
    server = LiveServer(create_app(slow, model_name="known", sampler=SAMPLER))
    try:
        stream = server.client().completions.create(model="known", prompt="床前", max_tokens=48, stream=True,
                                                   extra_body={"cache": "none", "parallel": "schedule"})
        next(iter(stream))  # the first step arrived: the request is being denoised
        assert server.health()["active"] == 1
        stream.close()  # the client goes away
        deadline = time.monotonic() + 10
        while server.health()["active"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.health()["active"] == 0 and server.health()["completed"] == 0
    finally:
        server.stop()


def call(server, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(f"{server.url}{path}", data=body, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/v1/nothing-here", 404), ("POST", "/nothing", 404), ("GET", "/static/missing.js", 404),
    ("GET", "/v1/completions", 405), ("DELETE", "/v1/models", 405),
])
def test_unknown_routes_and_wrong_methods_are_openai_errors(real, method, path, status):
    code, body = call(real, method, path)
    assert code == status and set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert path in body["error"]["message"] and body["error"]["type"] == "invalid_request_error"


def test_special_token_strings_in_a_prompt_are_plain_text_as_on_the_cli(known):
    """The mask and end-of-turn tokens' strings are text (encoded as the CLI encodes a prompt):
    the known model answers the prompt of that many plain-text tokens."""
    tokenizer = known.pipe.tokenizer
    prompt = "床" + tokenizer.special_tokens["mask"] + tokenizer.special_tokens["eot"]
    ids = known.pipe.encode_prompt(prompt)
    assert tokenizer.mask_id not in ids and tokenizer.eot_id not in ids  # the oracle: plain text
    done = known.client().completions.create(model="known", prompt=prompt, max_tokens=64)
    assert done.usage.prompt_tokens == len(ids) and done.choices[0].text == expected_answer(known.pipe, prompt)
    messages = [{"role": "user", "content": tokenizer.special_tokens["mask"] + "x"}]
    chat = known.client().chat.completions.create(model="known", messages=messages, max_tokens=32)
    assert chat.usage.prompt_tokens == len(known.pipe.encode_prompt(messages)) > 12


def remask_serve(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "remask", "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_a_bad_host_or_a_taken_port_is_one_error_line(model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        for options, fragment in ((["--host", "256.1.1.1"], "256.1.1.1 is not a valid IP address"),
                                  (["--host", "::12345"], "is not a valid IP address"),
                                  (["--port", str(taken.getsockname()[1])], "cannot listen on 127.0.0.1")):
            out, err = remask_serve("--model", str(model_dir), *options).communicate(timeout=120)
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], err
            assert "serving" not in err and out == ""


def test_a_non_streaming_client_that_goes_away_stops_its_work(poem_tokenizer):
    model = KnownAnswer(poem_tokenizer, "床前明月光，疑是地上霜。" * 4, delay=0.05)
    server = LiveServer(create_app(Pipeline(model, poem_tokenizer), model_name="known", sampler=SAMPLER))
    try:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        body = {"prompt": "床前", "max_tokens": 48, "cache": "none", "parallel": "schedule"}  # 48 steps: 2.4 s
        connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        deadline = time.monotonic() + 10
        while server.health()["active"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        connection.sock.shutdown(socket.SHUT_RDWR)  # the client goes away before its answer
        connection.close()
        while server.health()["active"] and time.monotonic() < deadline:
            time.sleep(0.02)
        calls = model.calls
        time.sleep(0.3)
        assert server.health()["active"] == 0 and server.health()["completed"] == 0
        assert model.calls == calls < 40  # the engine stopped stepping it, well before its 48 steps
    finally:
        server.stop()


def test_ctrl_c_stops_the_server_within_2_s_with_long_jobs_running(tmp_path, poem_tokenizer):
    """SIGINT to `remask serve` while a 1024-step answer is being denoised and another waits: the
    process exits (130, interrupted) within 2 s, and the waiting clients get an answer, not a hang."""
    cfg = tiny_config(poem_tokenizer.vocab_size, max_sequence_length=1100).with_tokens(poem_tokenizer.special_ids,
                                                                                        poem_tokenizer.vocab_size)
    model = save_model(build_model(cfg), tmp_path / "long", tokenizer=poem_tokenizer)
    port = free_port()
    server = remask_serve("--model", str(model), "--port", str(port), "--max-tokens-limit", "1024", "--no-batching")
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                health = json.loads(urllib.request.urlopen(f"{url}/health", timeout=5).read())
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()
                time.sleep(0.1)
        body = json.dumps({"prompt": "床前", "max_tokens": 1024, "cache": "none", "parallel": "schedule"})
        clients = [http.client.HTTPConnection("127.0.0.1", port, timeout=60) for _ in range(2)]
        for client in clients:
            client.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        while health["active"] + health["queued"] < 2:
            assert time.monotonic() < deadline
            health = json.loads(urllib.request.urlopen(f"{url}/health", timeout=5).read())
        start = time.monotonic()
        server.send_signal(signal.SIGINT)
        code = server.wait(timeout=30)
        assert time.monotonic() - start < 2.0 and code == 130
        for client in clients:  # each gets a 503 in OpenAI's shape (or, cut at shutdown, a closed connection)
            try:
                reply = client.getresponse()
                assert reply.status == 503 and "shutting down" in json.loads(reply.read())["error"]["message"]
            except (http.client.RemoteDisconnected, ConnectionError):
                pass
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_finished_requests_are_freed_by_reference_counting(known, monkeypatch):
    """Every job and every engine row of a finished request is freed at once, without the cyclic
    garbage collector (a cycle made each one wait for gc's rare full passes: memory grew per round)."""
    from remask.serve.batcher import Batcher

    jobs, rows = [], []
    submit, engine = Batcher.submit, known.app.state.batcher.engine
    add = engine.add

    def watched_submit(self, job):
        jobs.append(weakref.ref(job))
        submit(self, job)

    def watched_add(*args, **kw):
        row = add(*args, **kw)
        rows.append(weakref.ref(row))
        return row

    monkeypatch.setattr(Batcher, "submit", watched_submit)
    monkeypatch.setattr(engine, "add", watched_add)
    client = known.client()
    gc.collect()
    gc.disable()
    try:
        for stream in (False, True):
            for stop in (None, "霜"):
                done = client.completions.create(model="known", prompt="床前", max_tokens=32, stream=stream, stop=stop)
                assert list(done) if stream else done.choices[0].text
        deadline = time.monotonic() + 10
        while known.health()["active"] and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)  # the last events are delivered
        assert len(jobs) == len(rows) == 4
        assert [j() for j in jobs] == [None] * 4 and [r() for r in rows] == [None] * 4
    finally:
        gc.enable()


@pytest.mark.slow
def test_the_page_animates_the_denoising_in_chromium(poem_tokenizer, tmp_path):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.exists(), "Debian's chromium is installed by scripts/setup.sh"
    slow = Pipeline(KnownAnswer(poem_tokenizer, SCRIPT, delay=0.15), poem_tokenizer)
    server = LiveServer(create_app(slow, model_name="known", sampler=SAMPLER))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])
            page = browser.new_page()
            page.goto(server.url)
            page.select_option("#parallel", "schedule")
            page.fill("#max_tokens", "16")
            page.fill("#prompt", "床前")
            page.click("#send")
            page.wait_for_selector(".message.assistant .token.masked", timeout=30_000)  # the animation started
            shot = tmp_path / "denoising.png"
            page.screenshot(path=str(shot))
            page.wait_for_selector('.message.assistant[data-state="done"]', timeout=60_000)
            answer = page.text_content(".message.assistant")
            browser.close()
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert answer == expected_answer(slow, [{"role": "user", "content": "床前"}])[:16]
    finally:
        server.stop()
