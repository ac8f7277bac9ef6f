"""The server with real parts: the official `openai` client against a live local server, step-level
batching against requests served alone, capacity and cancellation, and the page driven in headless
Chromium (Debian's, through Playwright)."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest
import torch
import uvicorn
from torch import nn

from remask.model import KV
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
        self.eos, self.delay = tokenizer.eos_id, delay
        self.config = SimpleNamespace(causal=False, max_sequence_length=96, vocab_size=tokenizer.vocab_size)
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, ids, attention_mask=None, positions=None, *, past=None, return_kv=False, logits_at=None):
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
        self.port = free_port()
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
    ({"prompt": "床前<|mdm_mask|>"}, 400, "contains the mask token"),
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
