"""Shared fixtures: tiny model configs, a poem tokenizer, saved model directories (a diffusion
model and its AR twin), a poem corpus file, and an isolated cache for every test."""

from __future__ import annotations

from pathlib import Path

import pytest

from remask.checkpoint import save_model
from remask.config import ModelConfig
from remask.model import build_model
from remask.tokenizer import Tokenizer

POEM_LINES = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
    "千山鸟飞绝，万径人踪灭。孤舟蓑笠翁，独钓寒江雪。",
]


def tiny_config(vocab_size: int, **overrides) -> ModelConfig:
    """A 2-layer model small enough for any test (override what a test needs)."""
    base = dict(vocab_size=vocab_size, d_model=32, n_layers=2, n_heads=2, mlp_hidden_size=64, max_sequence_length=96)
    return ModelConfig(**(base | overrides))


@pytest.fixture
def make_config():
    """tiny_config as a fixture: make_config(vocab_size, **overrides) -> ModelConfig."""
    return tiny_config


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Token and tokenizer caches go to a per-test directory, never to the user's home."""
    monkeypatch.setenv("REMASK_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(autouse=True)
def grad_mode_stays_on():
    """A test (or a benchmark's main it calls) must not switch autograd off for the tests after it."""
    import torch

    yield
    leaked = not torch.is_grad_enabled()
    torch.set_grad_enabled(True)
    assert not leaked, "this test left autograd disabled (torch.set_grad_enabled(False) outside a scope)"


@pytest.fixture(scope="session")
def poem_tokenizer() -> Tokenizer:
    return Tokenizer.train(POEM_LINES, kind="char")


def save_tiny_model(directory: Path, tokenizer: Tokenizer, *, seed: int = 3, **layout) -> Path:
    """A randomly initialised tiny model with `tokenizer` saved beside it (init_std 0.3 makes its
    predictions depend on context; at 0.02 every position predicts nearly the same token); `layout`:
    attention (and block_length) when not full."""
    cfg = tiny_config(tokenizer.vocab_size, init_std=0.3, **layout).with_tokens(tokenizer.special_ids,
                                                                               tokenizer.vocab_size)
    return save_model(build_model(cfg, seed=seed), directory, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, poem_tokenizer) -> Path:
    """A saved tiny diffusion model directory (weights + tokenizer). Do not modify it."""
    return save_tiny_model(tmp_path_factory.mktemp("models") / "mdm", poem_tokenizer)


@pytest.fixture(scope="session")
def ar_model_dir(tmp_path_factory, poem_tokenizer) -> Path:
    """The same, causal: an AR twin. Do not modify it."""
    return save_tiny_model(tmp_path_factory.mktemp("models") / "ar", poem_tokenizer, attention="causal")


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A fortune-format poem file of 24 short entries."""
    path = tmp_path / "poems.txt"
    path.write_text("\n%\n".join(POEM_LINES * 6) + "\n", encoding="utf-8")
    return path
