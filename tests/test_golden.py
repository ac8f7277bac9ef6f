"""Answers at temperature 0 stay token-identical to those recorded at 5e24d77 (before the one-door
refactor) for generate, chat, eval reversal and serve, on small trained models (tests/golden/)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "golden"))
import record  # noqa: E402

RECORDED = json.loads((Path(__file__).parent / "golden" / "outputs.json").read_text(encoding="utf-8"))


@pytest.mark.slow
def test_generate_matches_the_recorded_answers():
    assert record.generate_outputs() == RECORDED["generate"]


@pytest.mark.slow
def test_chat_matches_the_recorded_answers():
    assert record.chat_outputs() == RECORDED["chat"]


@pytest.mark.slow
def test_eval_reversal_matches_the_recorded_answers(tmp_path):
    assert record.reversal_outputs(tmp_path) == RECORDED["reversal"]


@pytest.mark.slow
def test_serve_matches_the_recorded_answers():
    assert record.serve_outputs() == RECORDED["serve"]
