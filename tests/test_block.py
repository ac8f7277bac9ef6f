"""Block diffusion (BD3-LM): the layout against the other two, the one-pass training loss against a
loop over blocks and against the full diffusion loss, the NELBO against exact enumeration, and the
exact-cache sampler against the uncached reference sampler, batched against single rows."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from remask.diffusion import mdm_loss
from remask.diffusion.block import (
    answer_offsets,
    block_forward_mask,
    block_log_likelihood,
    exact_block_bound,
    row_positions,
    two_stream_mask,
)
from remask.diffusion.likelihood import token_log_probs
from remask.errors import RemaskError
from remask.model import build_model
from remask.sampling import SamplerConfig, generate
from remask.sampling.engine import Engine
from remask.train.objectives import OBJECTIVES, DialogueBatch, MaskedInputs, Noise, TextBatch

V = 32
MASK = V - 1
EOS = V - 2


def block_model(block_length: int, seed: int = 3, **kw):
    cfg = tiny_config(V, max_sequence_length=64, init_std=0.3, attention="block", block_length=block_length, **kw)
    return build_model(cfg, seed=seed, dtype=torch.float64).eval()


# --- the layout -------------------------------------------------------------------------------------


def test_block_layout_spans_causal_to_full():
    """L' = 1 is the causal mask, L' >= T the full one: same weights, same logits."""
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
    weights = block_model(4).state_dict()

    def logits(**layout):
        model = build_model(tiny_config(V, max_sequence_length=64, init_std=0.3, **layout), dtype=torch.float64)
        model.load_state_dict(weights)
        return model(ids)

    torch.testing.assert_close(logits(attention="block", block_length=1), logits(attention="causal"))
    torch.testing.assert_close(logits(attention="block", block_length=12), logits())


def test_a_token_reaches_its_own_block_and_later_ones_only():
    model = block_model(4)
    ids = torch.randint(0, V - 2, (1, 12), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[0, 5] = (changed[0, 5] + 1) % (V - 2)  # position 5: block 1 (positions 4..7)
    diff = (model(changed) - model(ids))[0].abs().amax(-1)  # (T,)
    assert (diff[:4] == 0).all() and (diff[4:] > 1e-6).all()
    shifted = model(changed, positions=torch.arange(12) + 3)  # grid moved: position 5 now sits in block 2
    base = model(ids, positions=torch.arange(12) + 3)
    diff = (shifted - base)[0].abs().amax(-1)
    assert (diff[:5] == 0).all() and (diff[5:] > 1e-6).all()  # positions 1..4 share the block with 5


# --- training -----------------------------------------------------------------------------------------


def loop_over_blocks(model, inputs) -> torch.Tensor:
    """The oracle the one-pass loss replaces: each noisy block run after the clean blocks before it
    (a plain block-layout pass over clean prefix + noisy block), its logits kept."""
    B, L = inputs.ids.shape
    out = torch.zeros(B, L, V, dtype=torch.float64)
    for b in range(B):
        blocks = inputs.positions[b] // inputs.block_length
        for blk in blocks.unique():
            where = (blocks == blk).nonzero()[:, 0]
            lo, hi = int(where[0]), int(where[-1]) + 1
            x = torch.cat([inputs.ids[b, :lo], inputs.noisy[b, lo:hi]])[None]
            out[b, lo:hi] = model(x, None, inputs.positions[b, :hi])[0, lo:hi]
    return out


@pytest.mark.parametrize("task", ["pretrain", "sft"])
def test_one_pass_equals_a_loop_over_blocks(task):
    model = block_model(4)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, V - 2, (3, 14), generator=g)
    batch = TextBatch(ids) if task == "pretrain" else DialogueBatch(ids, torch.tensor([3, 5, 8]),
                                                                     torch.zeros_like(ids, dtype=torch.bool))
    objective = OBJECTIVES[(task, "bd")]
    inputs = objective.make_inputs(batch, Noise(MASK, block_length=4), g)
    expected = loop_over_blocks(model, inputs)
    from remask.train.objectives import block_logits

    torch.testing.assert_close(block_logits(model, inputs), expected, atol=1e-10, rtol=1e-10)
    if task == "sft":  # the answer starts on a block boundary; the prompt is never masked
        assert ((inputs.positions[:, 0] + batch.prompt_lengths) % 4 == 0).all()
        prompt = torch.arange(14)[None] < batch.prompt_lengths[:, None]
        assert not inputs.masked[prompt].any()
        loss = objective.loss(model, inputs)
        per_row = (-token_log_probs(expected, ids) * inputs.masked / inputs.p).sum(1) / (14 - batch.prompt_lengths)
        torch.testing.assert_close(loss, per_row.mean().float(), atol=1e-6, rtol=1e-6)
    else:
        loss = objective.loss(model, inputs)
        nll = (-token_log_probs(expected, ids) * inputs.masked / inputs.p).sum() / ids.numel()
        torch.testing.assert_close(loss, nll.float(), atol=1e-6, rtol=1e-6)


def test_one_block_over_the_sequence_is_the_full_diffusion_loss():
    """With L' >= L the block loss on the same masks and times is LLaDA's eq. (3) on a full model."""
    model = block_model(16)
    full = build_model(tiny_config(V, max_sequence_length=64, init_std=0.3), dtype=torch.float64).eval()
    full.load_state_dict(model.state_dict())
    ids = torch.randint(0, V - 2, (4, 16), generator=torch.Generator().manual_seed(3))
    inputs = OBJECTIVES[("pretrain", "bd")].make_inputs(TextBatch(ids), Noise(MASK, block_length=16),
                                                         torch.Generator().manual_seed(4))
    assert (inputs.p == inputs.p[:, :1]).all()  # one block: one time per row
    same = MaskedInputs(ids, inputs.noisy, inputs.masked, inputs.p[:, :1])
    torch.testing.assert_close(OBJECTIVES[("pretrain", "bd")].loss(model, inputs),
                               OBJECTIVES[("pretrain", "mdm")].loss(full, same), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(OBJECTIVES[("pretrain", "bd")].loss(model, inputs),
                               mdm_loss(full(inputs.noisy), ids, inputs.masked, inputs.p), atol=1e-6, rtol=1e-6)


def test_each_block_has_its_own_clipped_rate():
    ids = torch.zeros(2000, 12, dtype=torch.long)
    positions = row_positions(12, torch.full((2000,), 2))  # blocks: positions 2-3 | 4..7 | 8..11 | 12-13
    noisy, masked, p = block_forward_mask(ids, positions, 4, mask_id=MASK, eps=0.0, t_range=(0.3, 0.8),
                                          generator=torch.Generator().manual_seed(5))
    for lo, hi in ((0, 2), (2, 6), (6, 10), (10, 12)):
        assert (p[:, lo:hi] == p[:, lo:lo + 1]).all()
    assert p.min() >= 0.3 and p.max() <= 0.8
    assert (p[:, 2] != p[:, 6]).float().mean() > 0.99  # independent between blocks
    assert abs(masked.float().mean() - 0.55) < 0.01 and torch.equal(noisy == MASK, masked)


def test_two_stream_mask_by_hand():
    """L = 4, L' = 2, positions 0..3: noisy block 1 sees itself and clean block 0; clean sees clean <= own."""
    m = two_stream_mask(torch.arange(4)[None], 2)[0, 0].int()
    assert m.tolist() == [
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 1, 1],
    ]


# --- likelihood ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt_len", [4, 5])
def test_nelbo_monte_carlo_agrees_with_exact_enumeration(prompt_len):
    model = block_model(3)
    prompt = torch.randint(0, V - 2, (prompt_len,), generator=torch.Generator().manual_seed(6))
    answer = torch.randint(0, V - 2, (7,), generator=torch.Generator().manual_seed(7))
    exact = exact_block_bound(model, prompt, answer, 3, mask_id=MASK)
    est = block_log_likelihood(model, prompt, answer, 3, mask_id=MASK, mc_num=1024, batch_size=64,
                               generator=torch.Generator().manual_seed(8))
    assert abs(est.log_likelihood - exact) < 4 * est.stderr and est.stderr < 0.2


def test_blocks_of_one_token_give_the_exact_likelihood():
    """L' = 1: each block is one masked position given the clean text before it, so the bound is
    the exact log-likelihood, written here as a plain loop."""
    model = block_model(1)
    prompt, answer = torch.tensor([3, 4, 5]), torch.tensor([6, 7, 8, 9])
    expected = 0.0
    for i in range(4):
        x = torch.cat([prompt, answer[:i], torch.tensor([MASK])])[None]
        expected += torch.log_softmax(model(x)[0, -1], -1)[answer[i]].item()
    assert exact_block_bound(model, prompt, answer, 1, mask_id=MASK) == pytest.approx(expected, abs=1e-5)
    est = block_log_likelihood(model, prompt, answer, 1, mask_id=MASK, mc_num=16, batch_size=16)
    assert est.log_likelihood == pytest.approx(expected, abs=1e-5) and est.stderr == pytest.approx(0, abs=1e-6)


# --- sampling --------------------------------------------------------------------------------------------


def engine_answer(model, prompt, sampler, eos_ids=()):
    engine = Engine(model, mask_id=MASK, vocab_size=V, eos_ids=list(eos_ids))
    row = engine.add(prompt, sampler)
    engine.run()
    return row.result(), engine.stats


@pytest.mark.parametrize("prompt_len", [4, 5, 7])
@pytest.mark.parametrize("steps", [16, 8])
def test_cached_block_sampling_equals_the_uncached_reference(prompt_len, steps):
    """The reference sampler (every step recomputes the whole canvas under the block mask) with
    semi-autoregressive blocks of L' on the model's grid, against the engine's exact cache."""
    model = block_model(4)
    prompt = torch.randint(0, V - 2, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    grid = int(answer_offsets(torch.tensor(prompt_len), 4))

    def uncached(ids, attention_mask):
        return model(ids, attention_mask, grid + torch.arange(ids.shape[1]))

    sampler = SamplerConfig(gen_length=16, steps=steps, stop_at_eos=False)
    expected = generate(uncached, prompt, sampler.replace(block_length=4), mask_id=MASK)[0, prompt_len:]
    result, stats = engine_answer(model, prompt[0], sampler)
    assert result.answer == expected.tolist()
    assert len(set(expected.tolist())) > 3  # a model whose answers depend on the context
    # Exact cache: each step runs the current block, plus the finished one once per block.
    per_block = steps // 4
    assert stats.forward_passes == steps and stats.query_tokens == prompt_len + 4 * per_block + 12 * (per_block + 1)


def test_batched_rows_equal_single_rows_at_different_blocks():
    model = block_model(4)
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, V - 2, (n,), generator=g) for n in (3, 6, 9)]
    samplers = [SamplerConfig(gen_length=16, steps=16, stop_at_eos=False),
                SamplerConfig(gen_length=12, steps=6, parallel="threshold", threshold=0.5, stop_at_eos=False),
                SamplerConfig(gen_length=8, steps=8, stop_at_eos=False)]
    singles = [engine_answer(model, p, s)[0].answer for p, s in zip(prompts, samplers)]
    engine = Engine(model, mask_id=MASK, vocab_size=V)
    rows = [engine.add(prompts[0], samplers[0])]
    engine.step(), engine.step()  # the first row is into its answer when the others arrive
    rows += [engine.add(p, s) for p, s in zip(prompts[1:], samplers[1:])]
    engine.run()
    assert [r.result().answer for r in rows] == singles
    engine = Engine(model, mask_id=MASK, vocab_size=V)  # a row cancelled mid-answer: the others are unchanged
    rows = [engine.add(p, s) for p, s in zip(prompts, samplers)]
    engine.step(), engine.step(), engine.step()
    engine.remove(rows[1])
    engine.run()
    assert [rows[0].result().answer, rows[2].result().answer] == [singles[0], singles[2]]


def test_a_joining_row_runs_its_prompt_in_a_pass_of_its_own():
    """A row's first pass (its prompt, nothing cached yet) is not batched with the other rows'
    steps, which would pad each of them to the prompt's width; later passes run at most the
    finished block and the current one (2 L' positions) a row."""
    model = block_model(4)
    widths = []  # (batch rows, width, whether the pass reads a cache) of each forward pass
    forward = model.forward

    def spy(ids, *args, past=None, **kw):
        widths.append((ids.shape[0], ids.shape[1], past is not None))
        return forward(ids, *args, past=past, **kw)

    model.forward = spy
    g = torch.Generator().manual_seed(12)
    engine = Engine(model, mask_id=MASK, vocab_size=V)
    sampler = SamplerConfig(gen_length=12, steps=12, stop_at_eos=False)
    rows = [engine.add(torch.randint(0, V - 2, (3,), generator=g), sampler)]
    engine.step(), engine.step()
    rows.append(engine.add(torch.randint(0, V - 2, (20,), generator=g), sampler))  # a long prompt joins
    engine.step()
    assert widths[-2:] == [(1, 20 + 4, False), (1, 4, True)]  # its prompt alone; the first row's step alone
    engine.run()
    assert all(w <= 8 for _, w, cached in widths if cached) and widths[4][0] == 2  # then they share steps


def test_block_sampling_stops_at_end_of_text_and_the_row_leaves():
    """No fixed answer length: a row ends in the block where its end-of-text is revealed with
    everything before it, costs nothing after, and the others run on unchanged."""
    model = block_model(4)
    prompt = torch.randint(0, V - 2, (5,), generator=torch.Generator().manual_seed(10))
    free, _ = engine_answer(model, prompt, SamplerConfig(gen_length=32, steps=32, stop_at_eos=False))
    eos = free.answer[6]  # pretend the token the model writes at answer position 6 is end-of-text
    first = free.answer.index(eos)
    result, stats = engine_answer(model, prompt, SamplerConfig(gen_length=32, steps=32), eos_ids=[eos])
    assert result.ended and result.answer[:first + 1] == free.answer[:first + 1]
    assert stats.forward_passes <= (first // 4 + 1) * 4 < 32  # the blocks up to its end-of-text only
    other = torch.randint(0, V - 2, (4,), generator=torch.Generator().manual_seed(11))
    alone, _ = engine_answer(model, other, SamplerConfig(gen_length=32, steps=32), eos_ids=[eos])
    engine = Engine(model, mask_id=MASK, vocab_size=V, eos_ids=[eos])
    rows = [engine.add(p, SamplerConfig(gen_length=32, steps=32)) for p in (prompt, other)]
    while not rows[0].finished:
        engine.step()
    assert engine.active == 1 and engine.rows == [rows[1]]  # the ended row has left the batch
    engine.run()
    assert rows[0].result().answer == result.answer and rows[1].result().answer == alone.answer


# --- the workflows -------------------------------------------------------------------------------------


def test_pretrain_convert_sft_generate_and_score_a_block_model(corpus, tmp_path, capsys):
    """`--objective bd --block-length 4` end to end; an AR twin converted with --model.init-from;
    SFT keeps the block length; generate and eval ppl take the block path from the model itself."""
    import json

    from remask.app.cli import main as cli_main
    from remask.checkpoint import load_model

    common = ["--data", str(corpus), "--preset", "tiny", "--model.d-model", "32", "--model.n-layers", "2",
              "--model.n-heads", "2", "--model.mlp-hidden-size", "64", "--seq-len", "32", "--batch-size", "4",
              "--max-steps", "4", "--run.val-every", "2", "--run.val-batches", "1", "--no-progress", "--device", "cpu"]
    assert cli_main(["pretrain", *common, "--objective", "bd", "--block-length", "4", "--out", str(tmp_path / "bd")]) == 0
    cfg = load_model(tmp_path / "bd" / "final").config
    assert (cfg.attention, cfg.block_length) == ("block", 4)
    rows = [json.loads(x) for x in (tmp_path / "bd" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["val_loss"] > 0 for r in rows if "val_loss" in r)
    assert cli_main(["pretrain", *common, "--objective", "ar", "--out", str(tmp_path / "ar")]) == 0
    assert cli_main(["pretrain", "--data", str(corpus), "--model.init-from", str(tmp_path / "ar" / "final"),
                     "--objective", "bd", "--block-length", "8", "--seq-len", "32", "--batch-size", "4",
                     "--max-steps", "2", "--no-progress", "--device", "cpu", "--out", str(tmp_path / "conv")]) == 0
    conv = load_model(tmp_path / "conv" / "final")
    assert (conv.config.attention, conv.config.block_length) == ("block", 8)
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": "床前", "response": "明月光"}) for _ in range(12)) + "\n")
    assert cli_main(["sft", "--model", str(tmp_path / "bd" / "final"), "--data", str(data), "--objective", "bd",
                     "--seq-len", "32", "--batch-size", "4", "--max-steps", "2", "--no-progress", "--device", "cpu",
                     "--out", str(tmp_path / "sft")]) == 0
    assert load_model(tmp_path / "sft" / "final").config.block_length == 4  # the model's own by default
    capsys.readouterr()
    assert cli_main(["generate", "--model", str(tmp_path / "sft" / "final"), "--prompt", "床前", "--chat", "--json",
                     "--gen-length", "12", "--steps", "12"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["ids"]) <= 12
    text = tmp_path / "held.txt"
    text.write_text("床前明月光\n", encoding="utf-8")
    assert cli_main(["eval", "ppl", "--model", str(tmp_path / "bd" / "final"), "--data", str(text), "--split", "all",
                     "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"first": "床前明月光", "second": "疑是地上霜"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert cli_main(["eval", "reversal", "--model", str(tmp_path / "sft" / "final"), "--test", str(pairs), "--json",
                     "--gen-length", "8", "--steps", "8"]) == 0
    rows = json.loads(capsys.readouterr().out)["models"]
    assert [r["kind"] for r in rows.values()] == ["block diffusion"] and set(rows.popitem()[1]["answers"]) == {"forward", "backward"}
    assert report["nats_per_token"] > 0 and report["measure"] == "upper bound on the NLL (block diffusion, blocks of 4)"


@pytest.mark.parametrize("argv, fragment", [
    (["--objective", "bd"], "--block-length is required with --objective bd"),
    (["--objective", "mdm", "--block-length", "4"], "--block-length (4) is for --objective bd only"),
    (["--objective", "bd", "--block-length", "4", "--t-min", "0.8", "--t-max", "0.3"], "--t-min (0.8) must be below"),
    (["--run.attention-kernel", "flex"], "--run.attention-kernel flex is for --objective bd"),
    (["--objective", "bd", "--block-length", "4", "--run.attention-kernel", "flex", "--device", "cpu"],
     "--run.attention-kernel flex needs a CUDA device"),
])
def test_block_settings_are_checked_before_anything_is_written(corpus, tmp_path, capsys, argv, fragment):
    from remask.app.cli import main as cli_main

    code = cli_main(["pretrain", "--data", str(corpus), "--out", str(tmp_path / "run"), "--no-progress", *argv])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


# --- infilling ---------------------------------------------------------------------------------------


def test_a_block_model_infills_from_a_block_boundary_seeing_its_own_block_only(poem_tokenizer):
    """`Pipeline.infill` on a block model: with the block offset, the text after BOS starts a block,
    and the fill equals a hand-written loop (the whole canvas at those rotary positions every step,
    the most confident mask revealed); tokens in a later block than the masks never change the
    fill, and in the masks' own block they do (for some change of them)."""
    from remask.pipeline import Pipeline

    tok = poem_tokenizer
    cfg = tiny_config(tok.vocab_size, max_sequence_length=64, init_std=0.3, attention="block", block_length=8)
    model = build_model(cfg, seed=5, dtype=torch.float64).eval()
    pipe = Pipeline(model, tok)
    assert pipe.block_offset() == 7 and pipe.layout == "block"
    text = tok.encode("床前明月光，疑是地上霜。")
    ids = [tok.bos_id, *[tok.mask_id] * 5, *text[5:]]  # the first half unknown
    region = slice(1, 6)
    sampler = SamplerConfig(gen_length=5, steps=5, block_length=None, temperature=0.0)

    def by_hand(ids, offset):
        x = torch.tensor([ids])
        with torch.no_grad():
            for _ in range(5):
                logits = model(x, positions=torch.arange(offset, offset + x.shape[1]))[0, :, :tok.vocab_size]
                logits[:, tok.mask_id] = float("-inf")
                conf, pred = logits.softmax(-1).max(-1)
                masked = (x[0] == tok.mask_id) & (torch.arange(x.shape[1]) >= 1) & (torch.arange(x.shape[1]) < 6)
                i = int(torch.where(masked, conf, torch.tensor(-1.0, dtype=conf.dtype)).argmax())
                x[0, i] = pred[i]
        return x[0, region].tolist()

    for offset in (0, 7):
        assert pipe.infill(ids, region, sampler, offset=offset) == by_hand(ids, offset)
    assert by_hand(ids, 0) != by_hand(ids, 7)  # the grid matters here: an ignored offset fails the line above
    # offset 0: block 0 is BOS and the first 7 text tokens; text from index 7 on (…地上霜。) lies in later blocks
    later = [*ids[:8], *[(t + 3) % (tok.vocab_size - 8) for t in ids[8:]]]
    assert pipe.infill(later, region, sampler) == pipe.infill(ids, region, sampler)
    # offset 7: the 12 text tokens from position 8: the masks and the next 3 text tokens share block 1
    fills = {tuple(pipe.infill([*ids[:6], *[t + k for t in ids[6:9]], *ids[9:]], region, sampler, offset=7))
             for k in range(1, 12)}
    assert len(fills) > 1
    with pytest.raises(RemaskError, match="a block model infills with no cache"):
        pipe.infill(ids, region, sampler.replace(parallel="threshold", threshold=0.9))
