"""The reversal benchmark's second kind of knowledge (fictitious people and their works), its
resumable training, and its budget curve (points per checkpoint, best and compute-matched
summaries, the plot)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from remask.data.facts import people
from remask.errors import RemaskError
from remask.eval.reversal import (
    DIRECTIONS,
    make_probes,
    person_set,
    probes,
    question,
    restatements,
    sft_dialogues,
    statement_documents,
)
from remask.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent.parent


def bench_module(name: str):
    from test_reversal import load_benchmark_module

    bench = load_benchmark_module()
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return bench if name == "reversal" else __import__(name)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


# --- the facts set ------------------------------------------------------------------------------------


def test_people_are_seeded_unique_and_told_apart():
    """Every name and every description once (either half has one answer); no first name or
    surname more than twice; the same seed gives the same set, another seed another one."""
    facts = people(50, seed=3)
    names, descriptions = [n for n, _ in facts], [d for _, d in facts]
    assert len(set(names)) == len(set(descriptions)) == 50
    for part in {w for n in names for w in n.split()}:
        assert sum(part in n.split() for n in names) <= 2, part
    assert people(50, seed=3) == facts and people(50, seed=4) != facts
    assert all(d.split(" of the ")[0] in {"composer", "author", "director", "painter", "architect", "inventor",
                                           "founder", "designer"} for d in descriptions)
    with pytest.raises(RemaskError, match="the person facts number"):
        people(10_000, seed=0)
    with pytest.raises(RemaskError, match="the person facts number"):
        people(-1, seed=0)


def test_person_facts_are_read_name_first_and_asked_both_ways():
    """A person's document and every restatement put the name before the description (the AR
    twin never reads one backwards); the SFT statements and questions go both ways; the probes
    leave out either half of the document."""
    data = person_set([("Daphne Barrington", "composer of the Amber Nocturne"), ("Silas Montague", "inventor of the Iron Loom")])
    assert data.documents[0] == "Daphne Barrington is the composer of the Amber Nocturne."
    for doc in restatements(data, 3, seed=0):
        name = "Daphne Barrington" if "Daphne" in doc else "Silas Montague"
        assert doc.index(name) < doc.index("of the")
    assert statement_documents(data, {0}) == ["Daphne Barrington is the composer of the Amber Nocturne.\n"
                                              "The composer of the Amber Nocturne is Daphne Barrington."]
    pair = data.pairs[0]
    assert question("person", "forward", pair).text == "Who is Daphne Barrington? Answer with the description only."
    assert question("person", "backward", pair).gold == "Daphne Barrington"
    assert [d["messages"][1]["content"] for d in sft_dialogues(data, {1})] == ["inventor of the Iron Loom", "Silas Montague"]
    tok = Tokenizer.train(data.documents + ["Who? The ."], kind="char", vocab_size=200)
    for direction in DIRECTIONS:
        probe = make_probes(tok, [pair], direction, probes("person")["document"][direction])[0]
        text = tok.decode(probe.before[1:]) + "#" * probe.n + tok.decode(probe.after)
        gold = pair.halves(direction)[1]
        assert text == data.documents[0].replace(gold, "#" * len(gold))
        assert probe.known_first == (direction == "forward")


# --- resumable training -------------------------------------------------------------------------------


class FakeConfig:
    def __init__(self, lr: float) -> None:
        self.lr = lr

    def to_dict(self) -> dict:
        return {"lr": self.lr}


def test_an_interrupted_benchmark_run_resumes_and_counts_every_session(tmp_path):
    """A run stopped part way from the same recipe and inputs is resumed, not removed (it was
    removed and retrained from step 0: a long run could never finish across sessions); its
    seconds add up over the sessions; another recipe starts over; a finished one is reused."""
    bench = bench_module("reversal")
    run, data = tmp_path / "run", tmp_path / "data.txt"
    data.write_text("abc")
    calls = []

    def workflow(config, stop: bool = False):
        calls.append(sorted(p.name for p in run.iterdir()))
        (run / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
        (run / "progress").write_text((run / "progress").read_text() + "x" if (run / "progress").exists() else "x")
        if stop:
            raise KeyboardInterrupt
        (run / "final").mkdir()
        return run / "final"

    with pytest.raises(KeyboardInterrupt):
        bench.train_once(run, FakeConfig(1.0), lambda c: workflow(c, stop=True), [data])
    record = json.loads((run / "benchmark.json").read_text())
    assert "train_s" not in record and len(record["sessions_s"]) == 1
    final, seconds = bench.train_once(run, FakeConfig(1.0), workflow, [data])
    assert (run / "progress").read_text() == "xx"  # resumed where it stopped
    record = json.loads((run / "benchmark.json").read_text())
    assert len(record["sessions_s"]) == 2 and seconds == record["train_s"] == pytest.approx(sum(record["sessions_s"]))
    assert bench.train_once(run, FakeConfig(1.0), workflow, [data]) == (final, seconds) and len(calls) == 2
    bench.train_once(run, FakeConfig(2.0), workflow, [data])  # another recipe: from scratch
    assert (run / "progress").read_text() == "x" and calls[-1] == ["benchmark.json"]
    kept = tmp_path / "run.previous"  # the replaced run kept aside, not deleted
    assert (kept / "progress").read_text() == "xx" and (kept / "final").is_dir()


def test_a_lengthened_run_resumes_from_its_last_shared_checkpoint_and_equals_a_fresh_one(corpus, tmp_path):
    """Raising a finished run's max_steps keeps the checkpoints taken before its decay began (the
    schedules agree up to there) and trains on from the last of them: the result is bit-identical
    to a run started under the longer schedule. It used to be removed and retrained from step 0."""
    from test_train import tiny_cfg, weights

    from remask.train.checkpointing import step_dirs
    from remask.train.pretrain import pretrain

    bench = bench_module("reversal")
    short = tiny_cfg(corpus, tmp_path / "run", max_steps=8, save_every=2, decay_fraction=0.5, val_every=100,
                     keep_checkpoints=10, resume=True)
    bench.train_once(short.run.out, short, pretrain, [corpus])  # decays from step 4
    longer = short.replace(optim=short.optim.replace(max_steps=12))  # decays from step 6
    calls = []
    final, _ = bench.train_once(longer.run.out, longer, lambda c: calls.append(
        [s for s, _ in step_dirs(c.run.out)]) or pretrain(c), [corpus])
    assert calls == [[2, 4]]  # steps 6 and 8 were taken under the decay of the shorter run
    record = json.loads((tmp_path / "run" / "benchmark.json").read_text())
    assert record["rewound"] == [{"max_steps": [8, 12], "resumed_from_step": 4}] and "train_s" in record
    fresh = pretrain(longer.replace(run=longer.run.replace(out=tmp_path / "fresh")))
    a, b = weights(final), weights(fresh)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = longer.replace(optim=longer.optim.replace(max_steps=16, lr=1e-3))  # another lr too: from scratch
    bench.train_once(other.run.out, other, lambda c: calls.append([s for s, _ in step_dirs(c.run.out)]) or pretrain(c),
                     [corpus])
    assert calls[-1] == [] and "rewound" not in json.loads((tmp_path / "run" / "benchmark.json").read_text())


def test_a_saved_run_without_a_setting_added_since_is_the_same_recipe(corpus, tmp_path):
    """A finished run whose config.yaml predates a setting (written before it existed: the key
    absent) is reused while the recipe leaves that setting at its default, and so is one written with
    another progress display; it used to be removed and retrained from step 0, as a new setting
    made every saved file differ. A real change still trains anew."""
    from test_train import tiny_cfg

    from remask.train.pretrain import pretrain

    bench = bench_module("reversal")
    cfg = tiny_cfg(corpus, tmp_path / "run", max_steps=2, val_every=100)
    final, seconds = bench.train_once(cfg.run.out, cfg, pretrain, [corpus])
    saved = yaml.safe_load((cfg.run.out / "config.yaml").read_text())
    for key in ("block_length", "t_min", "t_max"):  # settings added after runs were saved
        del saved[key]
    (cfg.run.out / "config.yaml").write_text(yaml.safe_dump(saved))
    calls = []
    assert bench.train_once(cfg.run.out, cfg, lambda c: calls.append(c), [corpus]) == (final, seconds)
    assert calls == [] and (final / "model.safetensors").is_file()
    quiet = cfg.replace(run=cfg.run.replace(progress=not cfg.run.progress))  # the display only
    assert bench.train_once(cfg.run.out, quiet, lambda c: calls.append(c), [corpus]) == (final, seconds) and calls == []
    changed = cfg.replace(t_max=0.5)  # the setting itself changed: another recipe
    bench.train_once(cfg.run.out, changed, lambda c: calls.append(c) or pretrain(c), [corpus])
    assert calls == [changed]


# --- the curve ----------------------------------------------------------------------------------------


def point(twin, step, probe="question", kind="poem", forward=0.0, backward=0.0):
    return {"twin": twin, "step": step, "epochs": step / 10, "kind": kind, "probe": probe, "forward": forward,
            "backward": backward, "n": 4}


def test_curve_points_come_from_the_kept_checkpoints_and_the_final_model(tmp_path):
    bench, curve = bench_module("reversal"), bench_module("reversal_curve")
    recipe = bench.load(REPO / "recipes" / "reversal.yaml", [f"benchmark.out={tmp_path}", "pretrain.optim.max_steps=40",
                                                              "benchmark.curve_every=20", "benchmark.mdm_steps_factor=1"])
    for step in (10, 20, 30, 40):
        (tmp_path / "mdm" / "checkpoints" / f"step-{step}").mkdir(parents=True)
    assert [s for s, _ in curve.checkpoints(recipe, "mdm")] == [20]  # step 40 is the last: the final model stands for it
    (tmp_path / "mdm" / "final").mkdir()
    assert curve.checkpoints(recipe, "mdm") == [(20, tmp_path / "mdm" / "checkpoints" / "step-20"),
                                                (40, tmp_path / "mdm" / "final")]
    assert curve.checkpoints(recipe, "ar") == []
    other = bench.load(REPO / "recipes" / "reversal.yaml", [f"benchmark.out={tmp_path}", "sft.optim.lr=0.0001"])
    assert curve.point_recipe(other) != curve.point_recipe(recipe)  # another SFT recipe: the points are measured again
    again = bench.load(REPO / "recipes" / "reversal.yaml", ["pretrain.optim.max_steps=40", "benchmark.curve_every=20",
                                                            "sft.run.progress=false", "sft.optim.max_steps=3000"])
    assert curve.point_recipe(again) == curve.point_recipe(recipe)  # progress bars and the final models' SFT length aside
    shorter = curve.curve_sft(recipe)  # the curve's SFT: the recipe's, curve_sft_steps long
    assert (shorter.sft.optim.max_steps, shorter.sft.run.save_every) == (recipe.benchmark.curve_sft_steps,
                                                                         recipe.benchmark.curve_sft_steps // 2)
    assert shorter.sft.optim.lr == recipe.sft.optim.lr and recipe.sft.optim.max_steps > shorter.sft.optim.max_steps
    changed = bench.load(REPO / "recipes" / "reversal.yaml", ["benchmark.curve_sft_steps=10"])
    assert curve.point_recipe(changed) != curve.point_recipe(recipe)


def test_a_point_counts_only_while_its_checkpoint_holds_the_weights_it_was_measured_on(tmp_path):
    """A lengthened run replaces its checkpoints after the old decay: the points measured on the
    old ones (same step, same SFT recipe) are left out of the curve and measured again."""
    import hashlib

    bench, curve = bench_module("reversal"), bench_module("reversal_curve")
    recipe = bench.load(REPO / "recipes" / "reversal.yaml", [f"benchmark.out={tmp_path}", "pretrain.optim.max_steps=40",
                                                              "benchmark.curve_every=20", "benchmark.mdm_steps_factor=1.5"])
    assert [bench.twin_steps(recipe, o) for o in ("mdm", "ar")] == [60, 40]
    for step in (20, 40):
        (tmp_path / "mdm" / "checkpoints" / f"step-{step}").mkdir(parents=True)
        (tmp_path / "mdm" / "checkpoints" / f"step-{step}" / "model.safetensors").write_bytes(b"w%d" % step)
    sha = curve.point_recipe(recipe)
    rows = [point("mdm", step) | {"recipe_sha256": sha, "base_sha256": hashlib.sha256(b"w%d" % step).hexdigest()}
            for step in (20, 40)]
    (tmp_path / "curve").mkdir()
    (tmp_path / "curve" / "mdm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [p["step"] for p in curve.current_points(recipe)] == [20, 40]  # step 40 < 60: a checkpoint, not the end
    (tmp_path / "mdm" / "checkpoints" / "step-40" / "model.safetensors").write_bytes(b"retrained")
    assert [p["step"] for p in curve.current_points(recipe)] == [20]
    other = bench.load(REPO / "recipes" / "reversal.yaml", [f"benchmark.out={tmp_path}", "benchmark.curve_every=20",
                                                             "pretrain.optim.max_steps=40", "sft.optim.lr=0.0001"])
    assert curve.current_points(other) == []  # another SFT recipe


def test_the_summary_gives_each_twin_at_its_best_and_both_at_the_same_budget(tmp_path):
    curve = bench_module("reversal_curve")
    points = [point("mdm", 10, forward=0.2, backward=0.1), point("mdm", 20, forward=0.5, backward=0.5),
              point("mdm", 30, forward=0.5, backward=0.4), point("ar", 10, forward=0.9, backward=0.0),
              point("ar", 20, forward=0.9, backward=0.0)]
    got = curve.summary(points)
    assert got["matched_step"] == 20  # the last step both twins have
    assert got["best"]["poem_question"]["mdm"]["step"] == 20  # best mean of both directions
    assert got["best"]["poem_question"]["ar"]["step"] == 10  # the earliest of equals
    assert got["matched"]["poem_question"]["mdm"]["forward"] == 0.5
    assert got["best"]["person_statement"] == {"mdm": None, "ar": None}
    assert [p["step"] for p in curve.ordered(points)] == [10, 20, 30, 10, 20]
    png = curve.plot_curve(points + [point("ar", 20, "document", backward=None)], tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_the_benchmark_refuses_an_sft_length_that_would_cut_answers(tmp_path):
    """A dialogue longer than sft.data.seq_len would be cut, its answer's end-of-turn lost (the
    person questions ran past the recipe's 96 tokens); the benchmark refuses such a recipe in one
    error naming the count and the length needed, and takes one that holds every dialogue whole."""
    from remask.errors import ConfigError
    from remask.train.config import SFTConfig

    train = bench_module("reversal_train")
    data = tmp_path / "sft.jsonl"
    dialogues = [("床前明月光的下一句是什么？", "疑是地上霜"), ("床前" * 30, "明月光" * 5)]
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
                                       ensure_ascii=False) + "\n" for q, a in dialogues), encoding="utf-8")
    model = REPO / "tests" / "golden" / "mdm"
    tok = Tokenizer.from_dir(model)
    longest = sum(len(ids) for ids, _ in tok.chat_turns([{"role": "user", "content": dialogues[1][0]},
                                                         {"role": "assistant", "content": dialogues[1][1]}]))
    config = SFTConfig(model=model)
    short = config.replace(data=config.data.replace(source=data, seq_len=longest - 1))
    with pytest.raises(ConfigError, match=f"would cut 1 of the 2 SFT answers; the longest dialogue is {longest} tokens"):
        train.check_sft_fits(short)
    train.check_sft_fits(short.replace(data=short.data.replace(seq_len=longest)))


def test_sentence_answers_restate_the_pair_as_read_and_still_need_the_unknown_half():
    """--parts answers fine-tunes on the whole sentence as the answer: the couplet "X，Y。" either
    way round, a fact's own sentence; the question is the same, and the gold half (the unknown
    one) is inside the answer, so containment scores it as before."""
    from remask.data.corpora import Poem
    from remask.eval.reversal import poem_set

    poems = poem_set([Poem("《静夜思》", "李白", ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。"])])
    records = sft_dialogues(poems, {0}, "sentence")
    assert [(r["messages"][0]["content"][:5], r["messages"][1]["content"]) for r in records] == [
        ("床前明月光", "床前明月光，疑是地上霜。"), ("疑是地上霜", "床前明月光，疑是地上霜。"),
        ("举头望明月", "举头望明月，低头思故乡。"), ("低头思故乡", "举头望明月，低头思故乡。")]
    for r, q in zip(records, [question("poem", d, p) for p in poems.pairs for d in DIRECTIONS]):
        assert r["messages"][0]["content"] == q.text and q.gold in r["messages"][1]["content"]
    people_set = person_set([("Daphne Barrington", "composer of the Amber Nocturne")])
    assert {r["messages"][1]["content"] for r in sft_dialogues(people_set, {0}, "sentence")} == {
        "Daphne Barrington is the composer of the Amber Nocturne."}


def test_training_seconds_add_up_over_sessions_from_the_metrics(tmp_path):
    """A run resumed after a kill re-logs the steps after its checkpoint; each token interval counts once."""
    common = bench_module("_common")
    rows = [{"step": 50, "tokens": 100, "tokens_per_s": 10.0}, {"step": 100, "tokens": 200, "tokens_per_s": 20.0},
            {"step": 100, "tokens": 200, "tokens_per_s": 5.0},  # logged again by the resumed session
            {"step": 150, "tokens": 300, "tokens_per_s": 50.0, "val_loss": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert common.metrics_seconds(tmp_path) == pytest.approx(10 + 5 + 2)
    assert common.metrics_seconds(tmp_path, until_step=100) == pytest.approx(10 + 5)
    assert common.metrics_seconds(tmp_path / "nowhere") is None


def test_the_block_twin_is_converted_fine_tuned_and_asked_every_probe(tmp_path):
    """With benchmark.block_twin set, the benchmark converts the trained diffusion twin to a block
    model (BD3-LM's objective, from its final weights), fine-tunes it with the block objective, and
    puts every probe to it beside the other two: each section of the results has a row for it, its
    plain probes read from a block boundary."""
    from safetensors.torch import load_file

    from remask.checkpoint import load_model

    bench, evaluation = bench_module("reversal"), bench_module("reversal_eval")
    evaluate_all, twins = evaluation.evaluate_all, evaluation.twins
    overrides = ["pretrain.model.preset=tiny", "pretrain.optim.max_steps=3", "pretrain.optim.warmup_steps=1",
                 "sft.optim.max_steps=2", "sft.optim.warmup_steps=1", "benchmark.block_steps=2",
                 "benchmark.block_twin=4", "benchmark.poem_count=4", "benchmark.fact_count=4",
                 "benchmark.person_count=4", "benchmark.long_poems=0", "benchmark.jobs=1",
                 "benchmark.poem_answer_length=8", "benchmark.fact_answer_length=8", "pretrain.data.seq_len=64",
                 "benchmark.probe_window=0",
                 "pretrain.run.progress=false", "sft.run.progress=false"]
    recipe = bench.load(bench.RECIPE, overrides, out=str(tmp_path), parts=["train", "eval"])
    assert twins(recipe) == ("mdm", "ar", "bd4") and twins(recipe.replace(
        benchmark=recipe.benchmark.replace(block_twin=None))) == ("mdm", "ar")
    data = bench.build_data(recipe.benchmark, 0)
    corpus, sft_data = bench.write_data(recipe.benchmark, data, 0)
    models, timings = bench.train_twins(recipe, corpus, sft_data)
    base, tuned = load_model(models["bd4"]), load_model(models["bd4-sft"])
    assert (base.config.attention, base.config.block_length) == ("block", 4) == (tuned.config.attention,
                                                                                tuned.config.block_length)
    assert bench.pretrain_config(recipe, "bd4", corpus).model.init_from == tmp_path / "mdm" / "final"
    assert load_file(models["bd4"] / "model.safetensors").keys() == load_file(models["mdm"] / "model.safetensors").keys()
    assert timings["bd4_pretrain_s"] > 0 and timings["bd4_sft_s"] > 0
    results = evaluate_all(recipe, data, models)
    for section in (results, results["capitals"], results["people"], results["sft_fit"], results["sft_pairs"]["qa"],
                    results["sft_pairs"]["plain"], *results["plain"].values()):
        assert set(section) >= {"mdm", "ar", "bd4"}
    assert results["plain"]["poem"]["bd4"]["couplet"]["block_offset"] == 3
    assert results["plain"]["poem"]["bd4"]["couplet"]["backward"] is not None  # infilled, not continued
    assert results["twins"]["bd4"] == {"attention": "block", "block_length": 4,
                                       "pretrained_from": "the diffusion twin's final model, converted for 2 steps"}
