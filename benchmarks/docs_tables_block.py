"""The block diffusion page's tables (docs/block.md) and its headline row, from block.json."""

from __future__ import annotations

from collections.abc import Callable

from tables import DASH, results, source, table


def block_nelbo() -> list[str]:
    """The likelihood table: the AR twin's exact NLL, the block models' NELBO, the diffusion bound."""
    part, by_run = results("block")["nelbo_info"], {r["run"]: r for r in results("block")["nelbo"]}
    names = [("ar", "AR twin"), *((f"bd{n}", f"block, L' = {n}") for n in (4, 8, 16)), ("mdm", "full diffusion")]
    rows = [[label, f"{by_run[k]['nats_per_token']:.3f} ± {by_run[k]['stderr']:.3f}", by_run[k]["measure"]] for k, label in names]
    s = part["measured"]["settings"]
    note = (f"{part['windows']} held-out windows of {s['seq_len']} tokens ({s['data']}, preset {s['preset']}, {s['steps']} steps of "
            f"{s['batch_size']} x {s['seq_len']} tokens each). Every block model between the AR twin and the diffusion "
            f"model: {'yes' if part['between_ar_and_diffusion'] else 'no'}; ordered by block length from AR to "
            f"diffusion: {'yes' if part['monotone_in_block_length'] else 'no'}.")
    return table(["model", "nats per token (± s.e.)", "measure"], rows) + ["", note, "", source("block", part="nelbo_info")]


def block_clip() -> list[str]:
    """Each model trained with t on [0, 1] and with t on the clipped range, both scored by the bound."""
    part = results("block").get("clip")
    if part is None:
        return ["(no clip part in block.json yet: `python benchmarks/block.py --parts clip`)"]
    lo, hi = part["t_range"]
    rows = [["AR twin", f"{part['ar_nats_per_token']:.3f} (exact NLL)", DASH, DASH]] if "ar_nats_per_token" in part else []
    for name, label in (("bd4", "block, L' = 4"), ("bd8", "block, L' = 8"), ("bd16", "block, L' = 16"), ("mdm", "full diffusion")):
        if name in part["nelbo"]:
            a, b = part["nelbo"][name], part["nelbo"][f"{name}-clip"]
            rows.append([label, f"{a['nats_per_token']:.3f} ± {a['stderr']:.3f}", f"{b['nats_per_token']:.3f} ± {b['stderr']:.3f}",
                         f"{part['clipped_minus_unclipped'][name]:+.3f}"])
    note = f"The same {part['windows']} held-out windows, every value the bound (t on [0, 1]) whatever the training range."
    if "between_ar_and_diffusion" in part:
        note += (f" Clipped block models between the AR twin and the clipped diffusion model: "
                 f"{'yes' if part['between_ar_and_diffusion'] else 'no'}; ordered by block length: "
                 f"{'yes' if part['monotone_in_block_length'] else 'no'}.")
    header = ["model", "trained with t on [0, 1]", f"trained with t on [{lo:g}, {hi:g}]", "difference"]
    return table(header, rows) + ["", note, "", source("block", part="clip")]


def reached(curve: list[dict], step: int | None) -> str:
    """Between which checkpoints of a conversion its NELBO first reached the target, and the seconds by then."""
    if step is None:
        return "not reached"
    i = next(i for i, p in enumerate(curve) if p["step"] == step)
    return f"{curve[i - 1]['step'] if i else 0}-{step} ({curve[i]['seconds']:.0f} s)"


def block_convert() -> list[str]:
    """Each conversion's NELBO after its steps, and when the scratch run reached as good a value."""
    part = results("block")["convert"]
    scratch = part["scratch_bd8"]
    rows = [["from scratch", f"{scratch[-1]['step']} ({scratch[-1]['seconds']:.0f} s)", f"{scratch[-1]['nats_per_token']:.3f}",
             DASH, DASH]]
    for name, label in (("ar-to-bd8", "from the trained AR twin"), ("mdm-to-bd8", "from the trained diffusion model")):
        end = part[name]["curve"][-1]
        i = next((i for i, p in enumerate(scratch) if p["nats_per_token"] <= end["nats_per_token"]), None)
        when = (f"not within its {scratch[-1]['step']} steps" if i is None else
                f"{scratch[i - 1]['step'] if i else 0}-{scratch[i]['step']} steps ({scratch[i]['seconds']:.0f} s)")
        rows.append([label, f"{end['step']} ({end['seconds']:.0f} s)", f"{end['nats_per_token']:.3f}", when,
                     reached(part[name]["curve"], part[name]["steps_to_target"])])
    header = ["L' = 8 block model", "fine-tuning steps (time)", "NELBO, nats/token", "scratch run reaches it between",
              "steps to the scratch model's final NELBO"]
    note = f"On {part['windows']} held-out windows; the scratch model's final NELBO {part['target_nats_per_token']:.3f}. "
    return table(header, rows) + ["", note + source("block", part="convert")]


def block_cost() -> list[str]:
    part = results("block")["cost"]
    names = [("mdm", "full diffusion"), ("ar", "AR twin"), *((f"bd{n}", f"block, L' = {n}") for n in (4, 8, 16))]
    rows = [[f"`{preset}`", label, f"{part[preset][k]['median_step_s']:.3f}", f"{part[preset][k]['tokens_per_s']:.0f}",
             f"{part[preset][k]['cost_per_token_over_mdm']:.2f}"]
            for preset in part if preset != "measured" for k, label in names]
    return table(["preset", "objective", "step s", "tokens/s", "cost per token / diffusion's"], rows) + ["", source("block", part="cost")]


def block_row(task: str, method: str) -> dict | None:
    return next((r for r in results("block")["methods"] if (r["task"], r["method"], r["batch_size"]) == (task, method, 1)), None)


def block_best(task: str, n: int, floor: float | None) -> dict | None:
    """The block model's fastest method at accuracy >= floor, else its most accurate; no floor: its most fluent."""
    rows = [r for r in results("block")["methods"] if r["task"] == task and r["method"].startswith(f"block{n}_") and r["batch_size"] == 1]
    if floor is None:
        return min(rows, key=lambda r: r["ar_nll_per_char"], default=None)
    good = [r for r in rows if r["accuracy"] >= floor]
    return max(good, key=lambda r: r["tokens_per_s"]) if good else max(rows, key=lambda r: r["accuracy"], default=None)


def block_sampling() -> list[str]:
    out = []
    for task, score in (("memorised_short", "accuracy"), ("memorised", "accuracy"), ("free", "ar_nll_per_char")):
        ar = block_row(task, "ar_kv_cache")
        if ar is None:
            continue
        floor = None if task == "free" else ar["accuracy"]  # free text has no true answer
        chosen = [ar, block_row(task, "ar_plain_kv_loop"), block_row(task, "dual_threshold_0.9"),
                  *(block_best(task, n, floor) for n in (4, 8, 16))]
        rows = [[r["method"], f"{r['tokens_per_s']:.1f}", f"{r['speedup_vs_ar_kv']:.2f}", f"{r['tokens_per_forward']:.2f}",
                 f"{r[score]:.3f}"] for r in chosen if r]
        out += [f"**{task}** (batch 1; {score.replace('_', ' ')})", ""]
        out += table(["method", "tok/s", "x AR KV", "tokens per pass", score.replace("_", " ")], rows) + [""]
    batch = [r for r in results("block")["methods"] if r["task"] == "batch" and r["batch_size"] > 1]
    rows = [[r["method"], f"{r['tokens_per_s']:.1f}", f"{r['speedup_vs_batch_1']:.2f}", f"{r['speedup_vs_ar_kv']:.2f}",
             f"{r['accuracy']:.3f}"] for r in batch]
    out += ["**batch** (16 mixed prompts at once)", ""] + table(["method", "tok/s", "x batch 1", "x AR KV (batch 16)", "agreement"], rows)
    stream = [r for r in results("block")["methods"] if r["task"] == "stream" and r["in_flight"] > 1]
    if stream:
        rows = [[r["method"], f"{r['tokens_per_s']:.1f}", f"{r['speedup_vs_batch_1']:.2f}", f"{r['rows_per_step']:.1f}",
                 f"{r['ms_per_row_step']:.2f}", f"{r['accuracy']:.3f}"] for r in stream]
        first = stream[0]
        out += ["", f"**stream** ({first['requests']} requests, {first['in_flight']} in flight, each joining as another ends)", ""]
        out += table(["method", "tok/s", "x one in flight", "rows a step", "ms a row-step", "agreement"], rows)
    return out + ["", source("block", rows=("block",))]


def block_headline() -> list[str]:
    """Block diffusion in one line: its best memorised_short setting against the AR twin, and its NELBO."""
    ar = block_row("memorised_short", "ar_kv_cache")
    best = max((block_best("memorised_short", n, ar["accuracy"]) for n in (4, 8, 16)), key=lambda r: r["tokens_per_s"])
    part = results("block")["nelbo_info"]
    nll = {r["run"]: r["nats_per_token"] for r in results("block")["nelbo"]}
    where = "between" if part["between_ar_and_diffusion"] else "not all between"
    return ["[block diffusion](docs/block.md): memorised_short, best block setting vs the AR twin's KV decoding",
            f"`{best['method']}` {best['tokens_per_s']:.0f} tok/s at accuracy {best['accuracy']:.3f}, "
            f"{best['speedup_vs_ar_kv']:.1f}x the AR twin ({ar['accuracy']:.3f}); NELBO "
            f"{nll['bd16']:.2f} / {nll['bd8']:.2f} / {nll['bd4']:.2f} nats/token at L' = 16 / 8 / 4, {where} the diffusion "
            f"bound {nll['mdm']:.2f} and the AR NLL {nll['ar']:.2f}"]


BLOCK_TABLES: dict[str, Callable[[], list[str]]] = {
    "block_nelbo": block_nelbo, "block_clip": block_clip, "block_convert": block_convert, "block_cost": block_cost,
    "block_sampling": block_sampling}
