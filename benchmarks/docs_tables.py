"""The tables of README.md and docs/*.md, rendered from benchmarks/results/*.json so that their
figures cannot drift from the measurements. Each table is a function of the result files; a
document holds it between `<!-- table: NAME -->` and `<!-- end table -->` lines, and
`python benchmarks/results_readme.py` rewrites what lies between them (a test checks that nothing
would change)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from docs_tables_block import BLOCK_TABLES, block_headline
from tables import DASH, f2, record, results, source, table


# --- sampling -------------------------------------------------------------------------------------
def sampling_row(task: str, method: str, batch_size: int = 1) -> dict | None:
    return next((r for r in results("sampling")["methods"]
                 if (r["task"], r["method"], r["batch_size"]) == (task, method, batch_size)), None)


def speed_cell(task: str, method: str, *extra: str) -> str:
    """'tok/s (speed-up over the reference), accuracy[, extra fields]' of one row, or a dash."""
    r = sampling_row(task, method)
    if r is None:
        return DASH
    cells = [f"{r['tokens_per_s']:.1f} ({r['speedup_vs_naive']:.2f})", f"{r['accuracy']:.3f}"]
    return ", ".join(cells + [f"{r[k]:.2f}" for k in extra if r.get(k) is not None])


SAMPLING_METHODS = [("reference", "reference"), ("lossless", "lossless savings"), ("prefix_cache", "prefix cache"),
                    ("dual_cache", "dual cache"), ("threshold_0.9", "threshold 0.9"),
                    ("prefix_threshold_0.9", "prefix cache + threshold 0.9"),
                    ("dual_threshold_0.9", "dual cache + threshold 0.9"), ("dual_factor_1", "dual cache + factor 1"),
                    ("ar_kv_cache", "AR twin, KV cache")]


def sampling_main() -> list[str]:
    header = ["method", "free, 256 tokens: tok/s (x), agreement with ref, AR-twin NLL/char", "memorised, 128 + 256",
              "memorised_short, 32 + 96", "couplets, forward", "couplets, backward"]
    rows = [[label, speed_cell("free", m, "ar_nll_per_char"), speed_cell("memorised", m),
             speed_cell("memorised_short", m), speed_cell("couplets_forward", m), speed_cell("couplets_backward", m)]
            for m, label in SAMPLING_METHODS]
    return table(header, rows) + ["", source("sampling")]


SHORT_METHODS = [("reference", "reference (block 32)"), ("one_per_step_b8", "reference sampler at block 8"),
                 ("one_per_step_b16", "reference sampler at block 16"),
                 ("prefix_b8_threshold_0.8", "prefix cache, block 8, threshold 0.8"),
                 ("dual_b8_threshold_0.8", "dual cache, block 8, threshold 0.8"),
                 ("dual_b8_threshold_0.9", "dual cache, block 8, threshold 0.9"),
                 ("dual_b16_threshold_0.9", "dual cache, block 16, threshold 0.9"),
                 ("prefix_b16_threshold_0.95", "prefix cache, block 16, threshold 0.95")]


def sampling_short() -> list[str]:
    header = ["method", "memorised_short: tok/s (x ref), accuracy", "sweep windows: tok/s (x ref), accuracy"]
    rows = [[label, speed_cell("memorised_short", m), speed_cell("thresholds", m)] for m, label in SHORT_METHODS]
    return table(header, rows) + ["", source("sampling")]


def sampling_batch() -> list[str]:
    rows = []
    for method in ("ar_kv_cache", "dual_threshold_0.9", "lossless"):
        alone, batched = sampling_row("batch", method, 1), next(
            r for r in results("sampling")["methods"] if r["task"] == "batch" and r["method"] == method and r["batch_size"] > 1)
        rows.append([method, f"{alone['tokens_per_s']:.1f}", f"{batched['tokens_per_s']:.1f} (batch {batched['batch_size']})",
                     f"{batched['speedup_vs_batch_1']:.2f}", f"{batched['accuracy']:.3f}"])
    header = ["method", "one at a time: tok/s", "batched: tok/s", "speed-up", "agreement with one at a time"]
    return table(header, rows) + ["", source("sampling")]


# --- reversal -------------------------------------------------------------------------------------
def twin_name(twin: str) -> str:
    """A twin's column name: diffusion, AR, block L'=16."""
    return {"mdm": "diffusion", "ar": "AR"}.get(twin, f"block L'={twin[2:]}")


def reversal_main() -> list[str]:
    """Held-out pairs of every kind, every probe, every twin side by side (the block twin too, when
    trained); and each twin asked its own SFT questions (the fit)."""
    r = results("reversal")
    names = {"poem": "poems", "capital": "capitals", "person": "people"}
    twins = list(r["plain"]["poem"])
    asked = {"poem": r, "capital": r["capitals"], "person": r["people"]}

    def both(x: dict | None) -> list[str]:
        if x is None:
            return [DASH, DASH]
        return [f2(x["forward"]), f2(x["backward"]) if x["backward"] is not None else f"{DASH} (cannot be asked)"]

    def each(by_twin: dict, *path: str) -> list[str]:
        row = []
        for twin in twins:
            x = by_twin[twin]
            for key in path:
                x = x[key]
            row += both(x)
        return row

    rows = []
    for kind, plain in r["plain"].items():
        document = "couplet" if kind == "poem" else "document"
        n = plain["mdm"][document]["n"]
        filled = "diffusion, block" if len(twins) > 2 else "diffusion"
        rows += [[f"{names[kind]} ({n} held out): the text as read ({filled}: infilled; AR: continued)",
                  *each(plain, document)],
                 [f"{names[kind]}: statement", *each(plain, "statement")],
                 [f"{names[kind]}: question after SFT", *each(asked[kind])]]
    fit = r["sft_fit"]
    rows.append([f"fit: each twin asked about its own {fit['mdm']['n']} SFT pairs (all kinds), both ways",
                 *each(fit)])
    header = ["pairs, contains gold", *(f"{twin_name(t)} {d}" for t in twins for d in ("fwd", "bwd"))]
    return table(header, rows) + ["", source("reversal")]


def curve_rows(columns: list[tuple[str, str, str]]) -> list[list[str]]:
    """One row per step of the budget curve: step, epochs, then (twin, kind, probe) per column as
    forward / backward (a dash where the twin has no point at that step, or no backward probe)."""
    curve = results("reversal")["curve"]
    points = {(p["twin"], p["kind"], p["probe"], p["step"]): p for p in curve}

    def cell(key: tuple) -> str:
        p = points.get(key)
        if p is None:
            return DASH
        return f2(p["forward"]) + " / " + (f2(p["backward"]) if p["backward"] is not None else DASH)

    return [[str(s), f"{next(p['epochs'] for p in curve if p['step'] == s):.0f}", *(cell((*c, s)) for c in columns)]
            for s in sorted({p["step"] for p in curve})]


def reversal_curve() -> list[str]:
    """The budget curve's poem points: both twins at each checkpoint."""
    probes = ("document", "statement", "question", "sft_fit")
    rows = curve_rows([(twin, "poem", probe) for probe in probes for twin in ("mdm", "ar")])
    header = ["step", "epochs", "diffusion infill", "AR continue", "diffusion statement", "AR statement",
              "diffusion question", "AR question", "diffusion fit", "AR fit"]
    return table(header, rows) + ["", "Held-out poem pairs, forward / backward (fit: the SFT pairs' own questions). "
                                  + source("reversal")]


def reversal_curve_facts() -> list[str]:
    """The budget curve's fact points: each twin's text as read and statement, capitals and people."""
    columns = [(twin, kind, probe) for kind in ("capital", "person") for twin, probe in
               (("mdm", "document"), ("ar", "document"), ("mdm", "statement"), ("ar", "statement"))]
    header = ["step", "epochs"] + [f"{k}: {w}" for k in ("capitals", "people") for w in (
        "diffusion infill", "AR continue", "diffusion statement", "AR statement")]
    return table(header, curve_rows(columns)) + ["", "Held-out facts, forward / backward. " + source("reversal")]


def reversal_sft_pairs() -> list[str]:
    s = results("reversal")["sft_pairs"]
    rows = [[what, f2(x["forward"]), f2(x["backward"]) if x["backward"] is not None else DASH] for what, x in (
        ("diffusion model, plain infilling", s["plain"]["mdm"]["couplet"]),
        ("diffusion model, statement", s["plain"]["mdm"]["statement"]), ("AR twin, statement", s["plain"]["ar"]["statement"]),
        ("diffusion model after SFT, asked the question", s["qa"]["mdm"]),
        ("AR twin after SFT, asked the question", s["qa"]["ar"]))]
    return table(["pairs of the SFT poems (stated both ways in pretraining)", "forward", "backward"], rows) + [
        "", source("reversal")]


# --- serve, training, throughput, loading, demo ---------------------------------------------------
def serve_main() -> list[str]:
    r = results("serve")

    def mb(s: dict, key: str) -> str:
        return DASH if s.get(key) is None else f"{s[key]:.0f}"

    def memory(s: dict) -> str:
        per_round = s.get("rss_mb_per_round")
        if not per_round:  # an older run: start / after the first round / at the end
            return f"{mb(s, 'rss_mb_before')} / {mb(s, 'rss_mb_after_first_round')} / {mb(s, 'rss_mb_after')}"
        spread, growth, warmup = (s.get(k) for k in ("rss_spread_after_warmup", "rss_mb_growth_per_round", "warmup_rounds"))
        after = f"after {warmup} warm-up rounds" if warmup else "after warm-up"
        return (f"{s['rss_mb_before']:.0f} / {min(per_round):.0f}-{max(per_round):.0f} over {len(per_round)} rounds"
                + ("" if spread is None else f" ({spread:.1%} {after}"
                   + ("" if growth is None else f", {growth:+.2f} MB a round") + ")"))

    rows = [[f"step-level batching {'on' if s['batching'] else 'off'}", str(s["clients"]), str(s["requests"]),
             f"{s['requests_per_s']:.1f}", f"{s['p50_ms'] / 1000:.2f}", f"{s['p99_ms'] / 1000:.2f}", f"{s['tokens_per_s']:.0f}",
             str(s["errors"]), memory(s)]
            for s in (r["batching_on"], r["batching_off"])]
    header = ["setting", "clients", "requests", "requests/s", "p50 s", "p99 s", "tokens/s", "errors",
              "resident MB: start / per round"]
    out = table(header, rows) + ["", f"Batching speed-up: {r['batching_speedup']:.2f}x. " + source("serve")]
    if "disconnect" in r and "ctrl_c" in r:
        d, c = r["disconnect"], r["ctrl_c"]
        out += ["", f"A client that goes away has its job dropped in {d['stream_s']:.3f} s streaming and "
                f"{d['non_stream_s']:.3f} s not ({d['completed']} of those jobs completed); Ctrl-C with a long job "
                f"running stops the server in {c['exit_s']:.2f} s (exit code {c['exit_code']}; the waiting client gets "
                f"{c['client_status']})."]
    return out


def training_main() -> list[str]:
    r = results("training")
    v, t, d = r["validation"], r["t_sampling"], r["ddp"]
    rows = [[f"training step (masking, forward, backward, AdamW), `{record('training')['settings']['preset']}` preset, "
             f"{r['measured']['cost']['settings']['batch_size']}x{r['measured']['cost']['settings']['seq_len']} tokens: "
             "tokens/s, MDM vs AR twin",
             f"{r['mdm']['tokens_per_s']:,.0f} vs {r['ar']['tokens_per_s']:,.0f} ({r['mdm']['fraction_of_peak']:.0%} vs "
             f"{r['ar']['fraction_of_peak']:.0%} of the matmul peak); MDM / AR step cost {r['mdm_over_ar_cost']:.2f}"],
            ["2-process DDP (gloo) vs 1 process", f"{d['2_process']['tokens_per_s']:,.0f} vs {d['1_process']['tokens_per_s']:,.0f} "
             f"tokens/s ({d['speedup_2_over_1']:.2f}x on {d['cores']} cores)"],
            [f"validation after equal tokens ({r['measured']['validation']['settings']['steps']} steps, {v['mdm']['tokens']:,} "
             "tokens; nats/token)",
             f"MDM bound {v['mdm']['val_loss']:.2f}; AR exact NLL {v['ar']['val_loss']:.2f}"],
            [f"MDM with stratified vs independent times ({r['measured']['t_sampling']['settings']['steps']} steps)",
             f"step-to-step spread of the training loss {t['spread_ratio']:.2f}x; "
             f"validation bound {t['stratified']['val_loss']:.2f} vs {t['uniform']['val_loss']:.2f}"]]
    stamps = "; ".join(f"{part} at {m['commit']} ({m['date'][:10]})" for part, m in r["measured"].items())
    return table(["what", "figure"], rows) + ["", f"Parts measured: {stamps}. " + source("training")]


def throughput_main() -> list[str]:
    r, s = results("throughput"), record("throughput")["settings"]
    rows = [[f"`{name}` ({m['parameters'] / 1e6:.1f}M)", f"{m['forward_tokens_per_s']:,.0f} ({m['forward_fraction_of_peak']:.0%})",
             f"{m['forward_backward_tokens_per_s']:,.0f} ({m['forward_backward_fraction_of_peak']:.0%})"]
            for name, m in r["models"].items()]
    header = [f"preset ({s['batch_size']}x{s['seq_len']} tokens, {s['dtype']})", "forward: tokens/s (of peak)",
              "forward + backward: tokens/s (of peak)"]
    return table(header, rows) + ["", f"Matmul peak {r['matmul_peak_flops_per_s'] / 1e9:.0f} GFLOP/s. " + source("throughput")]


def checkpoint_main() -> list[str]:
    r, s = results("checkpoint_load"), record("checkpoint_load")["settings"]
    rows = [[f"{v} ({r[v]['files']} file{'s' if r[v]['files'] > 1 else ''})", f"{r[v]['checkpoint_bytes'] / 1e9:.2f} GB",
             f"{r[v]['peak_rss_bytes'] / 1e9:.2f} GB", f"{r[v]['ratio']:.3f}", f"{r[v]['load_seconds']:.3f}"]
            for v in ("single", "sharded")]
    header = [f"{s['dtype']} checkpoint, {s['parameters'] / 1e6:.0f}M parameters", "checkpoint", "peak resident",
              f"ratio (limit {s['max_ratio']})", "load_model s"]
    return table(header, rows) + ["", source("checkpoint_load")]


def demo_main() -> list[str]:
    s = results("demo")["summary"]
    rows = [["samples", str(s["samples"])], ["ended at an end-of-text the model wrote", f"{s['ended']:.0%}"],
            ["reached the anchor", f"{s['at_anchor']:.0%}"], ["ran past the poem", f"{s['runs_past']:.0%}"],
            ["end on a complete line", f"{s['ends_at_line_end']:.0%}"],
            ["distinct ratio, mean / lowest (target 0.8)", f"{s['distinct_ratio_mean']:.2f} / {s['distinct_ratio_min']:.2f}"],
            ["AR twin's NLL, nats per character", f"{s['ar_nll_mean']:.2f}"]]
    return table(["the shipped sampler", "figure"], rows) + ["", source("demo")]


def headline() -> list[str]:
    rev, serve, train = results("reversal"), results("serve"), results("training")
    poem = rev["plain"]["poem"]
    short_ref, short_best = sampling_row("memorised_short", "reference"), sampling_row("memorised_short", "dual_threshold_0.9")
    ar_short = sampling_row("memorised_short", "ar_kv_cache")
    demo = results("demo")["summary"]
    rows = [["[reversal curse](docs/reversal.md): held-out couplets, forward / backward",
             f"diffusion model infilling {f2(poem['mdm']['couplet']['forward'])} / {f2(poem['mdm']['couplet']['backward'])}; "
             f"AR twin's statement {f2(poem['ar']['statement']['forward'])} / {f2(poem['ar']['statement']['backward'])}; "
             f"asked the question after SFT (the paper's protocol): diffusion {f2(rev['mdm']['forward'])} / "
             f"{f2(rev['mdm']['backward'])}, AR {f2(rev['ar']['forward'])} / {f2(rev['ar']['backward'])}"
             + "".join(f"; block twin (L' = {info['block_length']}) infilling inside a block "
                       f"{f2(poem[name]['couplet']['forward'])} / {f2(poem[name]['couplet']['backward'])}, after SFT "
                       f"{f2(rev[name]['forward'])} / {f2(rev[name]['backward'])}"
                       for name, info in rev.get("twins", {}).items() if info["attention"] == "block")],
            ["[fast sampling](docs/sampling.md): memorised_short, dual cache + threshold 0.9",
             f"{short_best['speedup_vs_naive']:.1f}x the reference at accuracy {short_best['accuracy']:.3f} "
             f"(reference {short_ref['accuracy']:.3f}; AR twin {ar_short['accuracy']:.3f} at {ar_short['tokens_per_s']:.0f} tok/s)"],
            ["[demo](docs/demo.md): 40 poems of the shipped sampler",
             f"{demo['ended']:.0%} end where the model ends them; distinct ratio {demo['distinct_ratio_mean']:.2f} "
             f"(lowest {demo['distinct_ratio_min']:.2f})"],
            ["[serving](docs/serve.md): 32 clients, step-level batching on / off",
             f"{serve['batching_on']['requests_per_s']:.1f} / {serve['batching_off']['requests_per_s']:.1f} requests/s "
             f"({serve['batching_speedup']:.1f}x)"],
            block_headline(),
            ["[training](docs/training.md): diffusion vs AR step cost", f"{train['mdm_over_ar_cost']:.2f}x"],
            ["[throughput](docs/throughput.md) and [loading](docs/checkpoint_load.md)",
             f"`small` forward at {results('throughput')['models']['small']['forward_fraction_of_peak']:.0%} of the matmul "
             f"peak; loading peaks at {results('checkpoint_load')['ratio']:.3f}x the checkpoint's bytes"]]
    return table(["benchmark", "headline (2-core CPU)"], rows)


TABLES: dict[str, Callable[[], list[str]]] = {
    "headline": headline, "sampling_main": sampling_main, "sampling_short": sampling_short,
    "sampling_batch": sampling_batch, "reversal_main": reversal_main, "reversal_sft_pairs": reversal_sft_pairs,
    "reversal_curve": reversal_curve, "reversal_curve_facts": reversal_curve_facts,
    "serve_main": serve_main, "training_main": training_main, "throughput_main": throughput_main,
    "checkpoint_main": checkpoint_main, "demo_main": demo_main} | BLOCK_TABLES
BLOCK = re.compile(r"(<!-- table: (\w+) -->\n)(.*?)(<!-- end table -->)", re.S)


def render(text: str) -> str:
    """`text` with every table block's body rewritten from the result files (an unknown name is an error)."""
    def fill(m: re.Match) -> str:
        if m.group(2) not in TABLES:
            raise KeyError(f"unknown generated table {m.group(2)!r} (known: {', '.join(TABLES)})")
        return m.group(1) + "\n".join(TABLES[m.group(2)]()) + "\n" + m.group(4)
    return BLOCK.sub(fill, text)


def documents(root: Path) -> list[Path]:
    """The documents that hold generated tables: README.md and docs/*.md."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]
