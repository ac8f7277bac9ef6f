"""The benchmark scripts' plumbing: merged results keep each row's own commit and date, bad input
is one `error:` line and exit code 2, and the rows say what they measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import POEM_LINES, save_tiny_model

from remask.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"


@pytest.fixture
def bench(monkeypatch):
    """The benchmarks folder importable (its scripts import `_common` as a top-level module)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import _common

    return _common


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory) -> Path:
    """A runs/reversal-like folder with tiny twins: mdm/final, ar/final (their training note says
    a pretraining length of 40), the corpus (one long document, then the poems) and two test pairs."""
    root = tmp_path_factory.mktemp("runs")
    tok = Tokenizer.train(POEM_LINES, kind="char")
    for name, layout in (("mdm", {}), ("ar", {"attention": "causal"}), ("bd4", {"attention": "block", "block_length": 4})):
        final = save_tiny_model(root / name / "final", tok, **layout)
        (final / "remask_training.json").write_text(json.dumps({"seq_len": 40}))
    (root / "corpus.txt").write_text("\n%\n".join(["".join(POEM_LINES), *POEM_LINES]), encoding="utf-8")
    pairs = [{"first": line[:6], "second": line[6:12]} for line in POEM_LINES[:2]]
    (root / "test_pairs.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    return root


def run_sampling(runs: Path, out: Path, *parts: str) -> None:
    import sampling

    sampling.main(["--runs", str(runs), "--out", str(out), "--parts", *parts, "--gen-length", "16", "--block-length", "8",
                   "--context", "8", "--short-context", "8", "--prompts", "1", "--short-prompts", "1", "--repeats", "1"])


@pytest.mark.slow
def test_sampling_merge_keeps_each_rows_commit(bench, tiny_runs, tmp_path, monkeypatch):
    """Two runs of different parts at two commits: each row keeps the commit it was measured at
    (the old writer stamped the last run's commit on every row), and a rerun part replaces its rows."""
    out = tmp_path / "sampling.json"
    monkeypatch.setattr(bench, "git_commit", lambda: "aaaaaaa")
    run_sampling(tiny_runs, out, "memorised")
    first = json.loads(out.read_text())["results"]["methods"]
    monkeypatch.setattr(bench, "git_commit", lambda: "bbbbbbb")
    run_sampling(tiny_runs, out, "couplets")
    record = json.loads(out.read_text())
    rows = record["results"]["methods"]
    assert record["commit"] == "bbbbbbb"  # the file's stamp: its last write
    assert {r["commit"] for r in rows if r["task"] == "memorised"} == {"aaaaaaa"}
    assert {r["commit"] for r in rows if r["task"].startswith("couplets")} == {"bbbbbbb"}
    assert [r for r in rows if r["task"] == "memorised"] == first  # untouched, dates included
    assert {r["task"] for r in rows} == {"memorised", "couplets_forward", "couplets_backward"}
    monkeypatch.setattr(bench, "git_commit", lambda: "ccccccc")
    run_sampling(tiny_runs, out, "memorised")
    rows = json.loads(out.read_text())["results"]["methods"]
    assert {r["commit"] for r in rows if r["task"] == "memorised"} == {"ccccccc"}
    assert len([r for r in rows if r["task"] == "memorised"]) == len(first)
    assert {r["commit"] for r in rows if r["task"].startswith("couplets")} == {"bbbbbbb"}


def test_sampling_rows_keep_the_interface_layout(bench, tiny_runs, tmp_path):
    """A row has the interface's fields (INTERFACE.md, sampling.json) and names what it measured:
    the model directory its answers came from, its task options, its sampler."""
    out = tmp_path / "sampling.json"
    run_sampling(tiny_runs, out, "memorised")
    record = json.loads(out.read_text())
    assert set(record) == {"name", "commit", "date", "device", "settings", "results"}
    for row in record["results"]["methods"]:
        assert {"method", "gen_length", "batch_size", "forward_passes", "tokens_per_forward", "tokens_per_s", "accuracy",
                "speedup_vs_naive", "task", "model", "settings", "commit", "date", "sampler"} <= set(row)
        twin = {"ar": "ar", "block4": "bd4"}.get(row["method"].split("_")[0], "mdm")
        assert row["model"] == str(tiny_runs / twin / "final")
        assert (row["sampler"] is None) == (twin == "ar")
        assert row["settings"] == {"runs": str(tiny_runs), "repeats": 1, "context": 8, "prompts": 1}
    rows = {r["method"]: r for r in record["results"]["methods"]}
    assert rows["reference"]["speedup_vs_naive"] == 1.0
    assert {"block4_one_per_step", "block4_threshold_0.9", "block4_factor_1"} <= set(rows)  # the block model beside the twins
    block = json.loads((tmp_path / "block.json").read_text())["results"]["methods"]  # INTERFACE.md's block.json rows
    assert {r["method"] for r in block} == {m for m in rows if m.startswith(("block", "ar"))} | {"dual_threshold_0.9"}
    assert all(r["block_length"] == (4 if r["method"].startswith("block") else None) and "task" in r for r in block)
    # the plain KV-cache loop (the AR baseline) writes what remask's own AR decoding writes
    assert rows["ar_plain_kv_loop"]["accuracy"] == rows["ar_kv_cache"]["accuracy"]
    assert rows["ar_plain_kv_loop"]["forward_passes"] == rows["ar_kv_cache"]["forward_passes"]


def test_stream_rows_agree_with_one_in_flight(bench, tiny_runs, tmp_path, monkeypatch):
    """The stream part: requests joining an engine as others end give the answers they give one at
    a time (agreement 1.0 for the exact block cache, whose answers do not depend on the batch),
    and the rows say how many rows a step carried. (The tiny tokenizer knows no Tang poem title:
    the prompts are the corpus's lines, cut to different lengths.)"""
    import sampling

    def prompts(pipe, docs, count, contexts):
        return [pipe.tokenizer.encode(POEM_LINES[i % len(POEM_LINES)])[:3 + 2 * i] for i in range(count)]

    monkeypatch.setattr(sampling, "free_prompts", prompts)
    out = tmp_path / "sampling.json"
    earlier = {"name": "block", "commit": "1234567", "date": "2026-01-01T00:00:00+00:00", "device": "cpu",
               "settings": {"steps": 9}, "results": {"nelbo": [{"run": "ar"}]}}  # block.py's parts, measured before
    (tmp_path / "block.json").write_text(json.dumps(earlier))
    sampling.main(["--runs", str(tiny_runs), "--out", str(out), "--parts", "stream", "--gen-length", "16",
                   "--block-length", "8", "--repeats", "1", "--batch", "3", "--stream-requests", "5"])
    rows = json.loads(out.read_text())["results"]["methods"]
    assert {(r["method"], r["in_flight"]) for r in rows} == {(m, n) for m in ("dual_threshold_0.9", "block4_threshold_0.9")
                                                            for n in (1, 3)}
    for r in rows:
        assert r["task"] == "stream" and r["requests"] == 5 and r["settings"]["stream_requests"] == 5
        assert r["rows_per_step"] == 1.0 if r["in_flight"] == 1 else 1.0 < r["rows_per_step"] <= 3
        assert r["row_steps"] >= r["steps"] and r["useful_tokens"] > 0
    block = {r["in_flight"]: r for r in rows if r["method"].startswith("block")}
    assert block[3]["accuracy"] == 1.0 and block[3]["row_steps"] == block[1]["row_steps"]
    record = json.loads((tmp_path / "block.json").read_text())  # its rows replaced, the other parts' stamp kept
    assert (record["commit"], record["date"], record["settings"]) == ("1234567", earlier["date"], {"steps": 9})
    assert record["results"]["nelbo"] == [{"run": "ar"}] and len(record["results"]["methods"]) == 4


def test_training_parts_keep_their_own_stamp(bench, tmp_path, monkeypatch):
    """training.py merges its parts: each part's commit, date and settings stay its own."""
    import training

    monkeypatch.setattr(bench, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(training, "run_part", lambda part, args, tmp: {part: {"figure": args.steps}})
    monkeypatch.setattr(bench, "git_commit", lambda: "aaaaaaa")
    monkeypatch.setattr(sys, "argv", ["training.py", "--parts", "validation", "ddp", "--steps", "600"])
    training.main()
    monkeypatch.setattr(bench, "git_commit", lambda: "bbbbbbb")
    monkeypatch.setattr(sys, "argv", ["training.py", "--parts", "t_sampling", "--steps", "400"])
    training.main()
    results = json.loads((tmp_path / "training.json").read_text())["results"]
    measured = results["measured"]
    assert (measured["validation"]["commit"], measured["validation"]["settings"]["steps"]) == ("aaaaaaa", 600)
    assert measured["ddp"]["commit"] == "aaaaaaa"
    assert (measured["t_sampling"]["commit"], measured["t_sampling"]["settings"]["steps"]) == ("bbbbbbb", 400)
    assert results["validation"] == {"figure": 600} and results["t_sampling"] == {"figure": 400}


@pytest.mark.parametrize("name, rows", [("sampling", lambda r: r["methods"]),
                                        ("training", lambda r: list(r["measured"].values()))])
def test_recorded_merged_results_stamp_every_row(name, rows):
    """The committed result files that merge runs: every row (part) has its own commit and date."""
    results = json.loads((RESULTS / f"{name}.json").read_text(encoding="utf-8"))["results"]
    for row in rows(results):
        assert isinstance(row["commit"], str) and len(row["commit"]) >= 7
        assert row["date"][:4] == "2026" and "settings" in row
    if name == "sampling":
        assert all({"task", "method", "model"} <= set(r) for r in results["methods"])


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args", [["benchmarks/sampling.py", "--runs", "no/such/runs"],
                                  ["benchmarks/demo.py", "--model", "no/such/model"],
                                  ["benchmarks/training.py", "--steps", "0"]])
def test_bad_input_is_one_error_line(args):
    """A RemaskError or a bad argument: one `error:` line on stderr, exit code 2, no traceback."""
    done = run_script(*args)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_interrupt_exits_130():
    code = ("import sys; sys.path.insert(0, 'benchmarks'); from _common import run_main\n"
            "def main():\n    raise KeyboardInterrupt\nrun_main(main)")
    done = run_script("-c", code)
    assert done.returncode == 130 and "Traceback" not in done.stderr


def numeric_leaves(value) -> list[float]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in numeric_leaves(v)]
    if isinstance(value, list):
        return [x for v in value for x in numeric_leaves(v)]
    return [float(value)] if isinstance(value, int | float) and not isinstance(value, bool) else []


def test_docs_tables_are_generated_from_the_results(bench):
    """README.md and docs/*.md hold their tables as results_readme.py renders them from the JSON
    (run `python benchmarks/results_readme.py` after a benchmark), and every decimal figure in a
    generated table is a value of the result files it names (or that value as a percentage, or in
    thousands, millions or billions), rounded as shown."""
    import re

    from docs_tables import BLOCK, documents
    from results_readme import stale_documents

    assert stale_documents(ROOT) == []
    for path in documents(ROOT):
        for block in BLOCK.finditer(path.read_text(encoding="utf-8")):
            body = block.group(3)
            names = set(re.findall(r"benchmarks/results/(\w+)\.json", body))
            values = [v for n in names for v in numeric_leaves(json.loads((RESULTS / f"{n}.json").read_text()))]
            if not names:  # the README's headline table links to the pages instead
                values = [v for p in RESULTS.glob("*.json") for v in numeric_leaves(json.loads(p.read_text()))]
            for shown in re.findall(r"(?<![\w.])\d[\d,]*\.\d+", body):
                digits = len(shown.split(".")[1])
                number = float(shown.replace(",", ""))
                assert any(abs(abs(v) * scale - number) <= 0.5 * 10**-digits + 1e-9  # the sign stands before the digits
                           for v in values for scale in (1, 100, 1e-3, 1e-6, 1e-9)), (path.name, block.group(2), shown)


@pytest.mark.parametrize("name, objective, block", [("bd16", "bd", 16), ("bd4", "bd", 4), ("mdm", "mdm", None)])
def test_a_clipped_run_differs_from_its_baseline_in_the_range_of_t_only(bench, tmp_path, name, objective, block):
    """benchmarks/block.py's clip part compares runs in pairs: the same data, model, batches,
    schedule and seed, t drawn from --clip-range in one and from [0, 1] in the other."""
    import argparse

    import block as bench_block

    args = argparse.Namespace(out=str(tmp_path), preset="tiny", steps=40, data="builtin:shakespeare", seq_len=32,
                              batch_size=4, lr=2e-3, progress=False, clip_range=[0.3, 0.8])
    base = bench_block.run_config(args, name).to_dict()
    clipped = bench_block.run_config(args, bench_block.clipped(name)).to_dict()
    assert (clipped.pop("t_min"), clipped.pop("t_max"), base.pop("t_min"), base.pop("t_max")) == (0.3, 0.8, 0.0, 1.0)
    assert clipped["run"].pop("out") == str(tmp_path / f"{name}-clip") and base["run"].pop("out") == str(tmp_path / name)
    assert clipped == base and (base["objective"], base["block_length"]) == (objective, block)
