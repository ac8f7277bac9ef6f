"""The one door (remask.pipeline) and the one translation of request settings
(remask.sampling.requests): what every surface relies on, against hand-written oracles."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from remask.errors import ConfigError, RemaskError
from remask.pipeline import Pipeline, cut_text, left_pad
from remask.sampling import SamplerConfig
from remask.sampling.requests import answer_positions, parse_settings, sampler_from_fields, sampler_from_words

SRC = Path(__file__).resolve().parents[1] / "src" / "remask"


def test_the_door_is_at_the_top_of_the_package():
    import remask
    import remask.pipeline

    assert remask.Pipeline is remask.pipeline.Pipeline


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return names


def test_no_import_runs_upward_and_surfaces_reach_the_model_through_the_pipeline():
    upward, around = [], []
    for path in SRC.rglob("*.py"):
        layer = path.relative_to(SRC).parts[0]
        names = imports_of(path)
        if layer not in ("app", "__main__.py") and any(n == "remask.app" or n.startswith("remask.app.") for n in names):
            upward.append(str(path.relative_to(SRC)))
        if layer in ("app", "serve", "eval") and names & {"remask.checkpoint.load_model_dir",
                                                         "remask.checkpoint.model_dir.load_model_dir"}:
            around.append(str(path.relative_to(SRC)))
    assert upward == []
    assert around == []


def test_left_pad_aligns_rows_to_the_right():
    ids, attention = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and attention.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_one_cutter_limit_then_end_of_text_then_stop_strings(model_dir):
    pipe = Pipeline.load(model_dir)
    tok = pipe.tokenizer
    text = tok.encode("床前明月光疑是")
    eos = tok.eos_id
    g = pipe.answer(text + [eos] + tok.encode("地上"))
    assert (g.text, g.ids, g.ended) == ("床前明月光疑是", text + [eos], True)
    g = pipe.answer(text + [eos], stops=["明月"])
    assert (g.text, g.ended) == ("床前", True)
    g = pipe.answer(text + [eos], limit=3)
    assert (g.text, g.ids, g.ended) == ("床前明", text[:3], False)  # cut by the limit: not ended
    assert cut_text("abcabc", ["c", "b"]) == ("a", True) and cut_text("abc", ["x", ""]) == ("abc", False)


def greedy_loop(model, prompt: list[int], n: int, stop: set[int]) -> list[int]:
    """The AR oracle: the whole sequence through the model at every step, argmax of the last position."""
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            nxt = int(model(torch.tensor([ids]))[0, -1, : model.config.vocab_size].argmax())
        ids.append(nxt)
        if nxt in stop:
            break
    return ids[len(prompt):]


def test_the_ar_twin_generates_left_to_right_with_its_kv_cache(ar_model_dir):
    pipe = Pipeline.load(ar_model_dir)
    sampler = SamplerConfig(gen_length=12, steps=12)
    for prompt in ("床前", "白日依山尽，"):
        ids = pipe.encode_prompt(prompt)
        got = pipe.generate(prompt, sampler)
        assert got.ids == greedy_loop(pipe.model, ids, 12, set(pipe.stop_ids()))
        assert got.reveal_step == list(range(len(got.ids)))


@pytest.mark.parametrize("which", ["model_dir", "ar_model_dir"])
def test_each_row_has_its_own_generator(which, request):
    """Sampled answers do not depend on the batch: a row equals the same prompt and seed alone."""
    pipe = Pipeline.load(request.getfixturevalue(which))
    sampler = SamplerConfig(gen_length=8, steps=8, block_length=4, temperature=0.9, remasking="random")
    prompts = [pipe.encode_prompt(p) for p in ("床前", "白日依山尽，", "春")]
    together = pipe.sample(prompts, sampler, [11, 12, 13])
    alone = [pipe.sample([p], sampler, [s])[0] for p, s in zip(prompts, [11, 12, 13])]
    assert [g.ids for g in together] == [g.ids for g in alone]
    assert len({tuple(g.ids) for g in together}) > 1  # the draws differ between rows


def test_the_context_check_names_the_sizes(model_dir):
    pipe = Pipeline.load(model_dir)
    with pytest.raises(RemaskError, match=r"prompt \(90 tokens\) \+ 16 new tokens exceeds the model's context of 96"):
        pipe.sample([[pipe.tokenizer.bos_id] * 90], SamplerConfig(gen_length=16, steps=16), [0])


def test_unknown_and_bad_settings_have_one_message():
    base = SamplerConfig(gen_length=16, steps=16, block_length=8)
    with pytest.raises(ConfigError, match="unknown sampler setting 'colour'"):
        sampler_from_fields(base, {"colour": "red"})
    with pytest.raises(ConfigError, match="unknown sampler setting 'colour'"):
        sampler_from_words(base, ["colour=red"])
    with pytest.raises(ConfigError, match="block_length must be > 0"):
        sampler_from_fields(base, {"block_length": 0}, max_tokens=8)
    with pytest.raises(ConfigError, match="steps takes an integer"):
        parse_settings(["steps=x"])


def test_max_tokens_become_whole_blocks():
    base = SamplerConfig(gen_length=64, steps=64, block_length=32)
    assert answer_positions(10, 4) == 12 and answer_positions(8, 4) == 8
    s = sampler_from_fields(base, {"cache": "dual"}, max_tokens=10)  # block min(32, 10) = 10
    assert (s.gen_length, s.block_length, s.steps, s.cache) == (10, 10, 10, "dual")
    s = sampler_from_fields(base, {"block_length": 4, "steps": 6}, max_tokens=10)
    assert (s.gen_length, s.block_length, s.steps) == (12, 4, 6)


def remask(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "remask", *args], capture_output=True, text=True, timeout=120)


def test_eval_choice_refuses_a_context_it_would_cut(model_dir, tmp_path):
    task = tmp_path / "task.jsonl"
    long = "床前明月光" * 30  # 150 characters: beyond the tiny model's 96-token context
    task.write_text(json.dumps({"context": long, "choices": ["疑", "是"], "answer": 0}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    proc = remask("eval", "choice", "--model", str(model_dir), "--task", str(task), "--json", "--no-progress")
    assert proc.returncode == 2 and proc.stderr.startswith("error: item 1") and "exceeds the model's context" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("stride", ["0", "-2"])
def test_eval_ppl_refuses_a_stride_that_is_not_positive(model_dir, corpus, stride):
    proc = remask("eval", "ppl", "--model", str(model_dir), "--data", str(corpus), "--split", "all", "--stride", stride,
                  "--no-progress")
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: stride must be in 1..96 (the model's context), got {stride}"


def test_eval_ppl_refuses_a_held_out_part_too_small_to_measure(model_dir, tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("床前明月光，疑是地上霜。举头望明月，低头思故乡。\n", encoding="utf-8")
    proc = remask("eval", "ppl", "--model", str(model_dir), "--data", str(one), "--no-progress")
    assert proc.returncode == 2 and "held-out part" in proc.stderr and proc.stderr.count("\n") == 1
