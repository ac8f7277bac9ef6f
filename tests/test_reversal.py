"""The reversal benchmark's builders: couplet parsing (pinned on the Tang poems, and on the
format's variations), seeded splits, SFT data that never holds a test poem, answering and scoring."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from remask.data.corpora import Poem, parse_fortune_poems, poem_sentences, tang300_poems
from remask.errors import RemaskError
from remask.eval.reversal import (
    COUPLET,
    DIRECTIONS,
    Pair,
    Question,
    capital_set,
    couplets,
    load_holdout,
    make_probes,
    place,
    poem_set,
    question,
    restatements,
    score_answers,
    sft_dialogues,
    split,
    statement_documents,
)
from remask.tokenizer import Tokenizer


def test_counts_on_the_tang_poems_are_pinned():
    data = poem_set(tang300_poems())
    # 1506: 1483 before the sentences of four halves (长大一相逢，问姓惊初见…) were read as two couplets
    assert data.stats == {"poems": 313, "poems_with_couplets": 312, "couplets": 1506, "couplets_dropped_as_ambiguous": 0}
    assert data.pairs[0] == Pair("兰叶春葳蕤", "桂华秋皎洁", 0)


def test_the_format_variations():
    text = ("\x1b[1;32m《秋夜・其二》\x1b[0m\n\x1b[33m作者：某\x1b[0m\n"  # colour codes, a sub-titled part
            "白日依山尽，\n黄河入海流。\n"  # a couplet wrapped over two lines
            "欲穷千里目。更上一层楼。\n"  # a couplet without a comma
            "并序：某年某月，余游于此，作诗以记之。\n"  # prose: three parts, not a couplet
            "春眠不觉晓，处处闻啼鸟，夜来风雨声。\n"  # three halves: skipped
            "床前看月光，疑是霜\n%\n")  # unequal halves, no end mark: skipped
    [poem] = parse_fortune_poems(text)
    assert poem.title == "《秋夜・其二》"
    assert couplets(poem) == [("白日依山尽", "黄河入海流"), ("欲穷千里目", "更上一层楼")]


def test_ambiguous_halves_are_dropped_and_no_couplet_is_an_error():
    twice = [Poem("《甲》", "作者：甲", ["春风吹又生，野火烧不尽。"]),
             Poem("《乙》", "作者：乙", ["春风吹又生，明月照高楼。白日依山尽，黄河入海流。"])]
    data = poem_set(twice)
    assert [(p.first, p.second, p.source) for p in data.pairs] == [("白日依山尽", "黄河入海流", 1)]
    assert data.stats["couplets_dropped_as_ambiguous"] == 2
    with pytest.raises(RemaskError, match="no usable couplets"):
        poem_set([Poem("《丙》", "作者：丙", ["一二三，四五。"])])


def test_holdout_pairs_of_unequal_halves_are_placed_and_asked_whole():
    """A pair is the two halves of a sentence split at its comma, whatever their lengths (both of
    these were "not couplets"): its poem is the test document; the questions and probes ask for
    the whole other half, however long."""
    poems = tang300_poems()
    holdout = [Pair("安能摧眉折腰事权贵", "使我不得开心颜", 0), Pair("蜀道之难", "难于上青天", 1)]
    data = poem_set(poems, holdout)
    sft_sources, test = split(data, test_fraction=0.2, seed=0, holdout=holdout)
    titles = [p.title for p in poems]
    assert test == [Pair("安能摧眉折腰事权贵", "使我不得开心颜", titles.index("《梦游天姥吟留别》")),
                    Pair("蜀道之难", "难于上青天", titles.index("《蜀道难》"))]
    assert not sft_sources & {p.source for p in test}
    assert question("poem", "backward", test[0]).text.startswith("使我不得开心颜的上一句")
    assert question("poem", "backward", test[0]).gold == "安能摧眉折腰事权贵"
    tok = Tokenizer.train(["安能摧眉折腰事权贵，使我不得开心颜。"], kind="char")
    forward, backward = (make_probes(tok, test[:1], d, COUPLET)[0] for d in DIRECTIONS)
    assert (forward.n, backward.n) == (7, 9)  # the gold half's length, not the known one's


def test_a_wrapped_or_subtitled_or_half_width_sentence_is_found():
    """Sentences as a fortune file writes them: wrapped over lines, a couplet ended by a comma
    before the next (十年离乱后，长大一相逢，), a sub-title line between parts, half-width marks."""
    text = ("《喜见外弟》\n作者：某\n十年离乱后，长大一相逢，\n问姓惊初见，称名忆旧容。\n"
            "其二\n春眠不觉晓，处处\n闻啼鸟。\n夜来风雨声, 花落知多少.\n%\n")
    [poem] = parse_fortune_poems(text)
    assert poem_sentences(poem) == ["十年离乱后，长大一相逢，问姓惊初见，称名忆旧容。", "春眠不觉晓，处处闻啼鸟。",
                                    "夜来风雨声，花落知多少。"]
    wanted = [Pair("问姓惊初见", "称名忆旧容", 0), Pair("春眠不觉晓", "处处闻啼鸟", 1), Pair("夜来风雨声，", "花落知多少", 2)]
    assert place([poem], wanted) == [Pair("问姓惊初见", "称名忆旧容", 0), Pair("春眠不觉晓", "处处闻啼鸟", 0),
                                     Pair("夜来风雨声", "花落知多少", 0)]
    assert ("十年离乱后", "长大一相逢") in couplets(poem) and ("问姓惊初见", "称名忆旧容") in couplets(poem)


def test_splits_are_a_function_of_the_seed_and_keep_test_poems_out_of_sft():
    data = poem_set(tang300_poems())
    a = split(data, test_fraction=0.2, seed=3)
    assert a == split(data, test_fraction=0.2, seed=3)
    assert a != split(data, test_fraction=0.2, seed=4)
    sft_sources, test = a
    records = sft_dialogues(data, sft_sources)
    text = json.dumps(records, ensure_ascii=False)
    test_poems = {p.source for p in test}
    assert not sft_sources & test_poems and test
    for pair in test:  # not a single line of a test poem, in either role
        assert pair.first not in text and pair.second not in text
    assert len(records) == 2 * sum(1 for p in data.pairs if p.source in sft_sources)


def test_restatements_keep_each_pair_in_reading_order_and_statements_keep_to_the_sft_documents():
    data = poem_set(tang300_poems()[:30])
    sft_sources, test = split(data, test_fraction=0.3, seed=1)
    again = restatements(data, 2, seed=5)
    assert again == restatements(data, 2, seed=5) and again != restatements(data, 2, seed=6)
    lines = [line for doc in again for line in doc.splitlines()]
    assert sorted(lines) == sorted(f"{p.first}，{p.second}。" for p in data.pairs for _ in range(2))
    facts = capital_set([("France", "Paris"), ("Peru", "Lima")])
    for doc, (country, capital) in zip(restatements(facts, 1, seed=0), [("France", "Paris"), ("Peru", "Lima")]):
        assert doc.index(country) < doc.index(capital)  # never the capital before its country
    text = "\n".join(statement_documents(data, sft_sources, "qa"))
    for pair in test:
        assert pair.first not in text and pair.second not in text
    for pair in data.pairs:
        if pair.source in sft_sources:
            assert (f"{pair.first}的下一句是什么？只回答这一句。{pair.second}。" in text
                    and f"{pair.second}的上一句是什么？只回答这一句。{pair.first}。" in text)
    plain = "\n".join(statement_documents(data, sft_sources))  # the default
    assert all(pair.first not in plain and pair.second not in plain for pair in test)
    first = next(p for p in data.pairs if p.source in sft_sources)
    assert f"{first.first}的下一句是{first.second}。" in plain and f"{first.second}的上一句是{first.first}。" in plain
    facts = statement_documents(capital_set([("France", "Paris"), ("Peru", "Lima")]), {0}, "qa")
    assert facts == ["What is the capital of France? Answer with the name only. Paris.\n"
                     "Which country has the capital Paris? Answer with the name only. France."]


def test_holdout_pairs_are_the_test_set(tmp_path):
    data = poem_set(tang300_poems())
    chosen = [data.pairs[5], data.pairs[400]]
    path = tmp_path / "holdout.jsonl"
    path.write_text("".join(json.dumps({"first": p.first, "second": p.second}, ensure_ascii=False) + "\n"
                            for p in chosen), encoding="utf-8")
    sft_sources, test = split(data, test_fraction=0.2, seed=0, holdout=load_holdout(path))
    assert test == chosen and not sft_sources & {p.source for p in chosen}
    path.write_text('{"first": "不是诗句", "second": "也不是"}\n', encoding="utf-8")
    with pytest.raises(RemaskError, match="not pairs of this set: 不是诗句 / 也不是$"):
        split(data, test_fraction=0.2, seed=0, holdout=load_holdout(path))
    path.write_text('{"first": 3}\n', encoding="utf-8")
    with pytest.raises(RemaskError, match=r":1: each line must be"):
        load_holdout(path)


def test_questions_and_scoring():
    pair = Pair("白日依山尽", "黄河入海流", 0)
    assert question("poem", "forward", pair) == Question(pair, "forward", "白日依山尽的下一句是什么？只回答这一句。", "黄河入海流")
    assert question("poem", "backward", pair) == Question(pair, "backward", "黄河入海流的上一句是什么？只回答这一句。", "白日依山尽")
    scored = score_answers(["黄河入海流", "是黄河入海流。", "黄河"], ["黄河入海流"] * 3)
    assert scored == {"accuracy": 2 / 3, "exact": 1 / 3, "n": 3}
    # a question that cannot be put to the model is no score at all, not a wrong answer
    assert score_answers([None, "黄河入海流"], ["黄河入海流"] * 2) == {"accuracy": None, "exact": None, "n": 2}


def test_capital_facts_are_read_one_way():
    data = capital_set([("France", "Paris"), ("Peru", "Lima"), ("Monaco", "Monaco")])
    assert data.documents[0] == "The capital of France is Paris."
    assert [(p.first, p.second) for p in data.pairs] == [("France", "Paris"), ("Peru", "Lima")]  # Monaco: ambiguous


def test_infill_and_answers_on_a_model_that_knows_one_couplet(poem_tokenizer):
    """A table model that always predicts the couplet 床前明月光，疑是地上霜 at its positions: infilling
    recovers either half from the other, and the answers come back as text."""
    from types import SimpleNamespace

    from torch import nn

    from remask.eval.reversal import infill_answers
    from remask.pipeline import Pipeline
    from remask.sampling import SamplerConfig

    tok = poem_tokenizer
    target = [tok.bos_id, *tok.encode("床前明月光，疑是地上霜。")]

    class Knows(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(causal=False, max_sequence_length=64, vocab_size=tok.vocab_size)
            self.anchor = nn.Parameter(torch.zeros(1))

        def forward(self, ids, attention_mask=None):
            logits = torch.zeros(*ids.shape, tok.vocab_size)
            for i in range(min(ids.shape[1], len(target))):
                logits[:, i, target[i]] = 5.0
            return logits

    pipe = Pipeline(Knows(), tok)
    pairs = [Pair("床前明月光", "疑是地上霜", 0)]
    sampler = SamplerConfig(gen_length=8, steps=8)
    assert infill_answers(pipe, pairs, "forward", sampler=sampler) == ["疑是地上霜"]
    assert infill_answers(pipe, pairs, "backward", sampler=sampler) == ["床前明月光"]


def test_probes_on_a_diffusion_model_that_knows_each_statement(poem_tokenizer):
    """The table model knows one text at its positions; the probe fills the unknown half of the
    template wherever it stands (first or last), after the BOS token."""
    from types import SimpleNamespace

    from torch import nn

    from remask.eval.reversal import probe_answers
    from remask.pipeline import Pipeline
    from remask.sampling import SamplerConfig

    tok = poem_tokenizer

    class Knows(nn.Module):
        def __init__(self, text: str):
            super().__init__()
            self.target = [tok.bos_id, *tok.encode(text)]
            self.config = SimpleNamespace(causal=False, max_sequence_length=64, vocab_size=tok.vocab_size)
            self.anchor = nn.Parameter(torch.zeros(1))

        def forward(self, ids, attention_mask=None):
            self.calls += 1
            logits = torch.zeros(*ids.shape, tok.vocab_size)
            for i in range(min(ids.shape[1], len(self.target))):
                logits[:, i, self.target[i]] = 5.0
            return logits

        calls = 0

    pairs = [Pair("白日依山尽", "黄河入海流", 0)]
    sampler = SamplerConfig(gen_length=8, steps=8)
    templates = {"forward": "{first}明月{second}。", "backward": "{second}明月{first}。"}
    for direction, text in (("forward", "白日依山尽明月黄河入海流。"), ("backward", "黄河入海流明月白日依山尽。")):
        got = probe_answers(Pipeline(Knows(text), tok), pairs, direction, template=templates[direction], sampler=sampler)
        assert got == [text[7:12]]
    # the same model on a template whose gold half comes first
    got = probe_answers(Pipeline(Knows("白日依山尽，黄河入海流。"), tok), pairs, "backward", template="{first}，{second}。",
                        sampler=sampler)
    assert got == ["白日依山尽"]
    # one step per mask by default; the sampler's steps per answer position otherwise (5 masks at 2/8: 1 step)
    for steps, calls in ((8, 5), (4, 2), (2, 1)):
        model = Knows("白日依山尽，黄河入海流。")
        got = probe_answers(Pipeline(model, tok), pairs, "forward", template="{first}，{second}。",
                            sampler=SamplerConfig(gen_length=8, steps=steps))
        assert (got, model.calls) == (["黄河入海流"], calls)


def test_a_probe_in_a_window_reads_the_training_length_and_reveals_only_the_answer(poem_tokenizer):
    """A table model that knows its text only in sequences of its training length (32), as a
    bidirectional model trained on full windows only: without `window` it answers wrongly; with it,
    every call sees 32 positions, the masks after the text stay masks at every step, and only the
    answer's positions are revealed (one call per answer mask)."""
    from types import SimpleNamespace

    from torch import nn

    from remask.eval.reversal import probe_answers
    from remask.pipeline import Pipeline
    from remask.sampling import SamplerConfig

    tok = poem_tokenizer
    text = "白日依山尽，黄河入海流。"
    target = [tok.bos_id, *tok.encode(text)]
    wrong = tok.encode("明")[0]

    class KnowsAtLength(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(causal=False, max_sequence_length=64, vocab_size=tok.vocab_size)
            self.anchor = nn.Parameter(torch.zeros(1))
            self.seen = []

        def forward(self, ids, attention_mask=None):
            self.seen.append(ids.clone())
            logits = torch.zeros(*ids.shape, tok.vocab_size)
            logits[..., wrong] = 5.0
            if ids.shape[1] == 32:
                logits[:, :len(target)] = 0.0
                for i, t in enumerate(target):
                    logits[:, i, t] = 5.0
            return logits

    pairs = [Pair("白日依山尽", "黄河入海流", 0)]
    sampler = SamplerConfig(gen_length=8, steps=8)
    for direction in ("forward", "backward"):
        gold = pairs[0].halves(direction)[1]
        short = probe_answers(Pipeline(KnowsAtLength(), tok), pairs, direction, template="{first}，{second}。",
                              sampler=sampler)
        assert short == ["明" * 5]
        model = KnowsAtLength()
        got = probe_answers(Pipeline(model, tok), pairs, direction, template="{first}，{second}。", sampler=sampler,
                            window=32)
        assert got == [gold] and len(model.seen) == 5
        assert all(x.shape == (1, 32) and (x[0, len(target):] == tok.mask_id).all() for x in model.seen)


def test_probes_on_the_ar_twin_equal_uncached_greedy_decoding(ar_model_dir, poem_tokenizer):
    """Batched, left-padded, KV-cached probing gives each pair the tokens of a plain greedy loop over
    the whole text (the oracle); a template with the unknown half first cannot be put to it."""
    from remask.eval.reversal import probe_answers
    from remask.pipeline import Pipeline
    from remask.sampling import SamplerConfig

    pipe = Pipeline.load(ar_model_dir)
    tok = poem_tokenizer
    pairs = [Pair("床前明月光", "疑是地上霜", 0), Pair("千山鸟飞绝", "万径人踪灭", 1), Pair("举头", "低头思故乡", 2)]
    sampler = SamplerConfig(gen_length=8, steps=8)
    for direction, template in (("forward", "{first}，{second}。"), ("backward", "{second}明月{first}。")):
        got = probe_answers(pipe, pairs, direction, template=template, sampler=sampler, batch_size=2)
        for pair, answer in zip(pairs, got):
            known, gold = (pair.first, pair.second) if direction == "forward" else (pair.second, pair.first)
            ids = [tok.bos_id, *tok.encode(known + template.split("}")[1].split("{")[0])]
            for _ in range(len(gold)):
                with torch.no_grad():
                    logits = pipe.model(torch.tensor([ids]))
                ids.append(int(logits[0, -1, :pipe.model.config.vocab_size].argmax()))
            assert answer == tok.decode(ids[-len(gold):])
    assert probe_answers(pipe, pairs, "backward", template="{first}，{second}。", sampler=sampler) == [None] * 3


def test_eval_reversal_command_in_each_mode(model_dir, ar_model_dir, tmp_path, capsys):
    """Each mode reports both directions for each model it can be put to; the statement probe is
    answered by the AR twin as by the diffusion model, infilling by the diffusion model only."""
    from remask.app.cli import main

    test = tmp_path / "pairs.jsonl"
    test.write_text('{"first": "床前明月光", "second": "疑是地上霜"}\n{"first": "白日依山尽", "second": "黄河入海流"}\n')
    for options in (["--mode", "qa"], ["--mode", "statement"], ["--mode", "statement", "--statement-style", "qa"]):
        assert main(["eval", "reversal", "--model", str(model_dir), "--model", str(ar_model_dir), "--test", str(test),
                     *options, "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["mode"] == options[1]
        rows = list(report["models"].values())
        assert [r["kind"] for r in rows] == ["diffusion", "autoregressive"]
        assert all(r["n"] == 2 and 0 <= r["forward"] <= 1 and 0 <= r["backward"] <= 1 for r in rows)
    assert main(["eval", "reversal", "--model", str(ar_model_dir), "--test", str(test), "--mode", "infill"]) == 2
    assert "is an AR twin" in capsys.readouterr().err
    # infilling in the window of the pretraining length its training note records; none without a note
    noted = tmp_path / "noted"
    shutil.copytree(model_dir, noted)
    (noted / "remask_training.json").write_text('{"step": 3, "seq_len": 24}')
    for options, window in (([], 24), (["--window", "0"], 0), (["--kind", "capital"], 24)):
        assert main(["eval", "reversal", "--model", str(noted), "--test", str(test), "--mode", "infill", *options,
                     "--json"]) == 0
        (row,) = json.loads(capsys.readouterr().out)["models"].values()
        assert row["window"] == window and row["n"] == 2
    assert main(["eval", "reversal", "--model", str(model_dir), "--test", str(test), "--mode", "infill", "--json"]) == 0
    assert [r["window"] for r in json.loads(capsys.readouterr().out)["models"].values()] == [None]
    assert main(["eval", "reversal", "--model", str(noted), "--test", str(test), "--mode", "infill",
                 "--window", "-1"]) == 2
    assert "--window must be 0 or more" in capsys.readouterr().err
    assert main(["eval", "reversal", "--model", str(noted), "--test", str(test), "--mode", "infill",
                 "--window", "100000"]) == 2
    assert "exceeds" in capsys.readouterr().err


def test_probes_take_the_fast_engines_settings(model_dir):
    """A cache or a parallel rule in the sampler is honoured, not dropped: with threshold decoding
    at a threshold every prediction passes, each probe is one forward pass instead of one per mask."""
    from remask.eval.reversal import infill_answers
    from remask.pipeline import Pipeline
    from remask.sampling import SamplerConfig

    pipe = Pipeline.load(model_dir)
    pairs = [Pair("床前明月光", "疑是地上霜", 0), Pair("白日依山尽", "黄河入海流", 1)]
    calls = []
    forward = pipe.model.forward
    pipe.model.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    sampler = SamplerConfig(gen_length=8, steps=8)
    reference = infill_answers(pipe, pairs, "backward", sampler=sampler, window=24)
    assert len(calls) == sum(len(pipe.tokenizer.encode(p.first)) for p in pairs)  # one pass per mask
    calls.clear()
    fast = infill_answers(pipe, pairs, "backward", sampler=sampler.replace(cache="dual", parallel="threshold",
                                                                            threshold=1e-9), window=24)
    assert len(calls) == len(pairs) and all(len(a) == len(r) for a, r in zip(fast, reference))


PAIRS = [("床前明月光", "疑是地上霜"), ("举头望明月", "低头思故乡"), ("白日依山尽", "黄河入海流"),
         ("春眠不觉晓", "处处闻啼鸟"), ("千山鸟飞绝", "万径人踪灭")]


def write_pairs(path, pairs) -> str:
    path.write_text("".join(json.dumps({"first": a, "second": b}, ensure_ascii=False) + "\n" for a, b in pairs),
                    encoding="utf-8")
    return str(path)


def eval_answers(main, capsys, model, test, *options) -> dict:
    assert main(["eval", "reversal", "--model", str(model), "--test", test, "--json", "--gen-length", "8",
                 "--steps", "8", *options]) == 0
    (row,) = json.loads(capsys.readouterr().out)["models"].values()
    return row["answers"]


def test_sampled_answers_do_not_depend_on_the_batch_size(model_dir, ar_model_dir, tmp_path, capsys):
    """Each question (and each AR probe) has its own generator from (seed, its index): at temperature
    0.7 the answers at --batch-size 1 and 4 are the same, for a diffusion model and an AR twin; and
    they are sampled (another seed gives other answers)."""
    from remask.app.cli import main

    test = write_pairs(tmp_path / "pairs.jsonl", PAIRS)
    runs = [(model_dir, ["--mode", "qa"]), (ar_model_dir, ["--mode", "qa"]), (ar_model_dir, ["--mode", "statement"])]
    for model, mode in runs:
        one, four = (eval_answers(main, capsys, model, test, *mode, "--temperature", "0.7", "--batch-size", size)
                     for size in ("1", "4"))
        assert one == four and len(one["forward"]) == len(PAIRS)
        other = eval_answers(main, capsys, model, test, *mode, "--temperature", "0.7", "--batch-size", "4",
                             "--seed", "1")
        assert other != four


def test_a_pair_longer_than_the_context_is_one_error_line_naming_it(model_dir, ar_model_dir, tmp_path, capsys):
    """A test pair whose question (or probe) does not fit the model's context (96 tokens) is bad
    input, named, not a traceback from the model."""
    from remask.app.cli import main

    long = "明月" * 50
    test = write_pairs(tmp_path / "pairs.jsonl", [PAIRS[0], (long, "疑是地上霜")])
    for model, mode in ((model_dir, "qa"), (ar_model_dir, "qa"), (model_dir, "infill"), (model_dir, "statement"),
                        (ar_model_dir, "statement")):
        assert main(["eval", "reversal", "--model", str(model), "--test", test, "--mode", mode]) == 2, (model, mode)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and long in err[0] and "context of 96" in err[0]


@pytest.mark.parametrize("size", ["0", "-2"])
def test_a_batch_size_below_one_is_refused(model_dir, tmp_path, capsys, size):
    from remask.app.cli import main

    test = write_pairs(tmp_path / "pairs.jsonl", PAIRS)
    assert main(["eval", "reversal", "--model", str(model_dir), "--test", test, "--batch-size", size]) == 2
    assert capsys.readouterr().err.strip() == f"error: --batch-size must be 1 or more, got {size}"


def test_per_row_generators_of_the_ar_twin_equal_decoding_each_row_alone(ar_model_dir):
    """ar_generate_cached with a generator per row gives each row the tokens it gets decoded alone
    (the oracle: a batch of one with that generator)."""
    from remask.pipeline import Pipeline, left_pad
    from remask.sampling.autoregressive import ar_generate_cached

    pipe = Pipeline.load(ar_model_dir)
    rows = [pipe.encode_prompt(text) for text in ("床前明月光，", "白日", "春眠不觉晓，处处")]
    ids, attention = left_pad(rows, pipe.tokenizer.pad_id)
    V = pipe.model.config.vocab_size
    generators = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    x, _ = ar_generate_cached(pipe.model, ids, 6, vocab_size=V, eos_ids=pipe.stop_ids(), attention_mask=attention,
                              temperature=0.9, generator=generators)
    for r, (row, seed) in enumerate(zip(rows, (5, 6, 7))):
        alone, _ = ar_generate_cached(pipe.model, torch.tensor([row]), 6, vocab_size=V, eos_ids=pipe.stop_ids(),
                                      temperature=0.9, generator=torch.Generator().manual_seed(seed))
        got = x[r, ids.shape[1]:ids.shape[1] + alone.shape[1] - len(row)]
        assert got.tolist() == alone[0, len(row):].tolist()


REPO = Path(__file__).resolve().parent.parent


def benchmark(*args, cwd):
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "reversal.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def load_benchmark_module():
    """benchmarks/reversal.py as a module (its directory on the path, for its sibling imports)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("reversal_benchmark", REPO / "benchmarks" / "reversal.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return module


def test_the_benchmark_recipe_loads_with_its_sections_and_overrides():
    """recipes/reversal.yaml: the twins' PretrainConfig and SFTConfig and the benchmark's options,
    changed by dotted overrides; what the script fills in per twin is not in the recipe."""
    from remask.train.config import PretrainConfig, SFTConfig

    bench = load_benchmark_module()
    path = REPO / "recipes" / "reversal.yaml"
    assert any(ln.startswith("# Launch: python benchmarks/reversal.py") for ln in path.read_text().splitlines())
    recipe = bench.load(path)
    assert isinstance(recipe.pretrain, PretrainConfig) and isinstance(recipe.sft, SFTConfig)
    assert (recipe.pretrain.optim.max_steps, recipe.sft.optim.max_steps, recipe.benchmark.poem_count) == (10800, 3600, 20)
    assert recipe.probe_window == recipe.pretrain.data.seq_len == 128  # the window defaults to the training length
    raw = yaml.safe_load(path.read_text())
    assert "objective" not in raw["pretrain"] and "source" not in raw["pretrain"]["data"] and "model" not in raw["sft"]
    changed = bench.load(path, ["pretrain.optim.max_steps=7", "benchmark.probe_window=0"], parts=["data"])
    assert (changed.pretrain.optim.max_steps, changed.probe_window, changed.benchmark.parts) == (7, 0, ["data"])
    mdm = bench.pretrain_config(changed, "ar", Path("c.txt"))
    assert (mdm.objective, mdm.data.source, mdm.run.out) == ("ar", "c.txt", Path("runs/reversal/ar"))
    with pytest.raises(RemaskError, match="pretrain.optim.nope: unknown OptimConfig"):
        bench.load(path, ["pretrain.optim.nope=1"])


def test_the_benchmark_builds_its_data_and_a_bad_holdout_is_one_error_line(tmp_path):
    """`--parts data` writes the corpus, the SFT dialogues and the test pairs (the holdout's) and
    trains nothing; a holdout pair that is not in the poems is one `error:` line, exit 2, nothing
    written (it was a traceback)."""
    data = poem_set(tang300_poems())
    holdout = tmp_path / "holdout.jsonl"
    write_pairs(holdout, [(data.pairs[5].first, data.pairs[5].second)])
    done = benchmark("--parts", "data", "--holdout", str(holdout), "--out", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["corpus.txt", "sft.jsonl", "sft_sentence.jsonl",
                                                                    "test_pairs.jsonl"]
    assert (tmp_path / "out" / "test_pairs.jsonl").read_text(encoding="utf-8") == holdout.read_text(encoding="utf-8")
    assert data.pairs[5].first not in (tmp_path / "out" / "sft.jsonl").read_text(encoding="utf-8")


def test_an_unplaceable_holdout_pair_is_named_in_the_one_error_line(tmp_path):
    """Every pair that is not the two halves of a sentence is named, in one `error:` line (it
    named the first, "e.g."), exit 2, nothing written."""
    holdout = tmp_path / "holdout.jsonl"
    write_pairs(holdout, [("床前明月光", "疑是地上霜"), ("不是诗句", "也不是"), ("问姓惊初见", "称名")])
    done = benchmark("--parts", "data", "--holdout", str(holdout), "--out", "bad", cwd=tmp_path)
    assert done.returncode == 2 and not (tmp_path / "bad").exists()
    assert done.stderr.splitlines() == ["error: 2 holdout pair(s) are not the two halves of a sentence of the poems split "
                                        "at its comma: 不是诗句 / 也不是; 问姓惊初见 / 称名"]


PAPER_PAIRS = [("蜀道之难", "难于上青天"), ("安能摧眉折腰事权贵", "使我不得开心颜"), ("问姓惊初见", "称名忆旧容")]


def test_parts_data_holds_out_the_papers_released_pairs(tmp_path):
    """Three pairs of the paper's released set that lie in the Tang poems (halves of unequal
    length; a comma the shipped file drops; a sentence after a couplet ended by a comma) were
    refused; `--parts data` now writes them as the test pairs and keeps their poems out of SFT."""
    holdout = tmp_path / "holdout.jsonl"
    write_pairs(holdout, PAPER_PAIRS)
    done = benchmark("--parts", "data", "--holdout", str(holdout), "--out", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    test = [json.loads(ln) for ln in (tmp_path / "out" / "test_pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["first"], r["second"]) for r in test] == PAPER_PAIRS
    sft = (tmp_path / "out" / "sft.jsonl").read_text(encoding="utf-8")
    corpus = (tmp_path / "out" / "corpus.txt").read_text(encoding="utf-8")
    for first, second in PAPER_PAIRS:
        assert first not in sft and second not in sft and first in corpus and second in corpus
    for title in ("《蜀道难》", "《梦游天姥吟留别》", "《喜见外弟又言别》"):  # the poems, read once each in pretraining
        assert corpus.count(title) == 1
