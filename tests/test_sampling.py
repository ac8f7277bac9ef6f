"""The reverse-process sampler against a hand-written transcription of LLaDA's algorithm, mock
models with known answers, and invariants recorded step by step."""

import math

import pytest
import torch

from remask.config import ConfigError, ModelConfig
from remask.errors import RemaskError
from remask.model import build_model
from remask.sampling import (
    REMASKING,
    SamplerConfig,
    StepInfo,
    answers_ended,
    block_slices,
    fill_masks,
    generate,
    gumbel_argmax,
    num_transfer_tokens,
)

VOCAB = 32
MASK_ID = VOCAB - 1  # the mask token is the last id, as in the tokenizer's layout
PAD_ID = VOCAB - 2  # an ordinary id used to left-pad
P = 5  # prompt length


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, mlp_hidden_size=64,
                      max_sequence_length=64, init_std=0.3)
    # A wide init makes predictions depend strongly on context (at 0.02 nearly every position
    # predicts the same token); float64 so that batching and padding cannot flip an argmax by rounding.
    return build_model(cfg, seed=3, dtype=torch.float64).eval()


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, MASK_ID, (2, P), generator=torch.Generator().manual_seed(11))


def fn(model):
    return lambda ids, attention_mask: model(ids, attention_mask)


class Steps(list):
    """An on_step callback keeping every StepInfo; `reveal_step` is the last one's."""

    def __call__(self, info: StepInfo) -> None:
        self.append(info)

    @property
    def reveal_step(self) -> torch.Tensor:
        return self[-1].reveal_step


# --- schedule ----------------------------------------------------------------------------


def test_num_transfer_tokens_hand_examples():
    rows = [[True] * 10, [True] * 3 + [False] * 7, [False] * 10, [True, False] * 5]
    got = num_transfer_tokens(torch.tensor(rows), 4)
    assert got.dtype == torch.int64
    assert got.tolist() == [[3, 3, 2, 2], [1, 1, 1, 0], [0, 0, 0, 0], [2, 1, 1, 1]]


def test_num_transfer_tokens_sums_to_mask_count():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(6, 37, generator=g) < 0.6
    for steps in (1, 5, 37):
        got = num_transfer_tokens(mask, steps)
        assert got.shape == (6, steps)
        assert got.sum(1).tolist() == mask.sum(1).tolist()
        assert ((got.max(1).values - got.min(1).values) <= 1).all()  # as even as possible


def test_block_slices():
    assert block_slices(3, 8, 4) == [slice(3, 7), slice(7, 11)]
    assert block_slices(0, 6, 6) == [slice(0, 6)]
    with pytest.raises(RemaskError, match="divisible"):
        block_slices(3, 8, 3)


# --- token choice and scores ---------------------------------------------------------------


def test_scores_on_hand_distribution():
    probs = [0.5, 0.3, 0.2]
    logits = torch.tensor([[[math.log(p) for p in probs]]])  # (1, 1, 3)
    x0 = torch.tensor([[1]])
    assert REMASKING["low_confidence"](logits, x0, None).item() == pytest.approx(0.3)
    assert REMASKING["margin"](logits, x0, None).item() == pytest.approx(0.2)
    assert REMASKING["entropy"](logits, x0, None).item() == pytest.approx(sum(p * math.log(p) for p in probs))
    rnd = REMASKING["random"](logits.expand(1, 500, 3), x0.expand(1, 500), torch.Generator().manual_seed(0))
    assert rnd.dtype == torch.float64 and 0 <= rnd.min() and rnd.max() < 1 and 0.45 < rnd.mean() < 0.55


def test_entropy_score_with_banned_token_is_finite():
    logits = torch.tensor([[[0.0, float("-inf"), math.log(3.0)]]])
    expected = 0.25 * math.log(0.25) + 0.75 * math.log(0.75)
    assert REMASKING["entropy"](logits, torch.tensor([[2]]), None).item() == pytest.approx(expected)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_gumbel_argmax_samples_softmax(temperature):
    base = [1.0, 0.0, -0.5, 0.7]
    n = 40_000
    logits = torch.tensor(base).expand(1, n, 4)
    draws = gumbel_argmax(logits, temperature, torch.Generator().manual_seed(1))
    freq = torch.bincount(draws.flatten(), minlength=4).double() / n
    z = [math.exp(v / temperature) for v in base]
    expected = [v / sum(z) for v in z]
    assert freq.tolist() == pytest.approx(expected, abs=0.012)  # ~5 standard errors


def test_gumbel_argmax_temperature_zero_is_argmax():
    logits = torch.tensor([[[0.1, 0.9, 0.3], [2.0, -1.0, 1.0]]])
    assert gumbel_argmax(logits, 0.0, None).tolist() == [[1, 0]]


# --- parity with a transcription of the paper's algorithm ---------------------------------


def python_softmax(row):
    finite = [v for v in row if v != -math.inf]
    top = max(finite)
    e = [0.0 if v == -math.inf else math.exp(v - top) for v in row]
    total = sum(e)
    return [v / total for v in e]


def python_score(name, probs, token):
    if name == "low_confidence":
        return probs[token]
    if name == "margin":
        first, second = sorted(probs, reverse=True)[:2]
        return first - second
    return sum(p * math.log(p) for p in probs if p > 0)  # entropy: minus the entropy


def reference_generate(model, prompt_rows, gen_length, steps, block_length, cfg_scale, remasking,
                       eos="allow", eos_ids=()):
    """LLaDA Algorithm 5 with blocks (B.3), written out one row and one position at a time."""
    x = [list(row) + [MASK_ID] * gen_length for row in prompt_rows]
    n_prompt = len(prompt_rows[0])
    n_blocks = gen_length // block_length
    per_block = steps // n_blocks
    for b in range(n_blocks):
        lo, hi = n_prompt + b * block_length, n_prompt + (b + 1) * block_length
        plan = []
        for row in x:
            m = sum(1 for t in row[lo:hi] if t == MASK_ID)
            plan.append([m // per_block + (1 if s < m % per_block else 0) for s in range(per_block)])
        for s in range(per_block):
            cond = model(torch.tensor(x))
            if cfg_scale > 0:  # eq. 16: the unconditional branch masks the whole prompt
                uncond = model(torch.tensor([[MASK_ID] * n_prompt + row[n_prompt:] for row in x]))
                logits = uncond + (1 + cfg_scale) * (cond - uncond)
            else:
                logits = cond
            for r, row in enumerate(x):
                candidates = []
                for i in range(lo, hi):
                    if row[i] != MASK_ID:
                        continue
                    values = logits[r, i].tolist()
                    values[MASK_ID] = -math.inf
                    if eos == "forbid":
                        for e in eos_ids:
                            values[e] = -math.inf
                    token = max(range(len(values)), key=lambda v: (values[v], -v))
                    score = python_score(remasking, python_softmax(values), token)
                    late = eos == "delay" and token in eos_ids
                    candidates.append((late, -score, i, token))
                candidates.sort()
                for _, _, i, token in candidates[: plan[r][s]]:
                    row[i] = token
    return x


COMBOS = [(8, 8, 8), (8, 4, 4), (12, 6, 4), (10, 3, 10), (16, 4, 8)]


@pytest.mark.parametrize("gen_length,steps,block_length", COMBOS)
@pytest.mark.parametrize("remasking", ["low_confidence", "margin", "entropy"])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_parity_with_transcription(model, prompt, gen_length, steps, block_length, remasking, cfg_scale):
    cfg = SamplerConfig(gen_length=gen_length, steps=steps, block_length=block_length,
                        remasking=remasking, cfg_scale=cfg_scale)
    got = generate(fn(model), prompt, cfg, mask_id=MASK_ID)
    with torch.no_grad():
        want = reference_generate(model, prompt.tolist(), gen_length, steps, block_length, cfg_scale, remasking)
    assert got.tolist() == want


@pytest.mark.parametrize("eos", ["forbid", "delay"])
def test_parity_with_transcription_eos_modes(model, prompt, eos):
    allowed = generate(fn(model), prompt, SamplerConfig(gen_length=12, steps=6, block_length=6), mask_id=MASK_ID)
    eos_ids = most_common(allowed[:, P:], 2)
    cfg = SamplerConfig(gen_length=12, steps=6, block_length=6, eos=eos, stop_at_eos=False)
    got = generate(fn(model), prompt, cfg, mask_id=MASK_ID, eos_ids=eos_ids)
    with torch.no_grad():
        want = reference_generate(model, prompt.tolist(), 12, 6, 6, 0.0, "low_confidence", eos, eos_ids)
    assert got.tolist() == want


def most_common(ids, n):
    return torch.bincount(ids.flatten(), minlength=VOCAB).topk(n).indices.tolist()


# --- invariants, recorded step by step -----------------------------------------------------


def expected_counts(block_length, per_block):
    return [block_length // per_block + (1 if s < block_length % per_block else 0) for s in range(per_block)]


@pytest.mark.parametrize("remasking", sorted(REMASKING))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("gen_length,steps,block_length", [(12, 6, 4), (10, 4, 5)])
def test_invariants(model, prompt, remasking, temperature, gen_length, steps, block_length):
    # Row 1 is left-padded with the mask id itself: padding must still never be touched.
    padded = prompt.clone()
    padded[1, :2] = MASK_ID
    attention_mask = torch.ones_like(prompt)
    attention_mask[1, :2] = 0
    cfg = SamplerConfig(gen_length=gen_length, steps=steps, block_length=block_length,
                        remasking=remasking, temperature=temperature, cfg_scale=0.5)
    infos: list[StepInfo] = []
    out = generate(fn(model), padded, cfg, mask_id=MASK_ID, attention_mask=attention_mask,
                   generator=torch.Generator().manual_seed(0), on_step=infos.append)
    per_block = steps // (gen_length // block_length)
    counts = expected_counts(block_length, per_block)
    assert [i.step for i in infos] == list(range(steps))
    before = torch.cat([padded, torch.full((2, gen_length), MASK_ID)], dim=1)
    for info in infos:
        b, s = divmod(info.step, per_block)
        assert info.block == b
        assert torch.equal(info.x[:, :P], padded)  # prompt (and padding) untouched
        assert info.revealed.sum(1).tolist() == [counts[s]] * 2  # exactly the scheduled count
        lo, hi = P + b * block_length, P + (b + 1) * block_length
        assert not info.revealed[:, :lo].any() and not info.revealed[:, hi:].any()  # only the current block
        assert (before[info.revealed] == MASK_ID).all() and (info.x[info.revealed] != MASK_ID).all()
        # committed tokens never change and masks stay masks unless revealed now
        assert torch.equal(info.x[~info.revealed], before[~info.revealed])
        before = info.x
    assert torch.equal(out, infos[-1].x)
    assert not (out[:, P:] == MASK_ID).any()


# --- mock models with known answers --------------------------------------------------------


def ramp_model(direction):
    """Position i predicts token i % (VOCAB - 1) with a logit growing (direction 1) or shrinking
    (direction -1) with i, whatever the input: confidence is monotone in the position."""

    def model_fn(ids, attention_mask):
        B, L = ids.shape
        logits = torch.zeros(B, L, VOCAB)
        pos = torch.arange(L)
        logits[:, pos, pos % (VOCAB - 1)] = 3.0 + direction * 0.1 * pos
        return logits

    return model_fn


@pytest.mark.parametrize("remasking", ["low_confidence", "margin", "entropy"])
def test_reveal_order_follows_confidence(prompt, remasking):
    # gen 8, blocks of 4, 2 steps per block -> 2 tokens per step.
    cfg = SamplerConfig(gen_length=8, steps=4, block_length=4, remasking=remasking)
    for direction, order in [(1, [1, 1, 0, 0, 3, 3, 2, 2]), (-1, [0, 0, 1, 1, 2, 2, 3, 3])]:
        rec = Steps()
        out = generate(ramp_model(direction), prompt, cfg, mask_id=MASK_ID, on_step=rec)
        assert rec.reveal_step[:, P:].tolist() == [order] * 2
        assert rec.reveal_step[:, :P].eq(-1).all()
        assert out[0, P:].tolist() == [i % (VOCAB - 1) for i in range(P, P + 8)]


def test_ties_reveal_leftmost_first(prompt):
    flat = lambda ids, attention_mask: torch.zeros(*ids.shape, VOCAB)
    rec = Steps()
    generate(flat, prompt, SamplerConfig(gen_length=6, steps=3), mask_id=MASK_ID, on_step=rec)
    assert rec.reveal_step[:, P:].tolist() == [[0, 0, 1, 1, 2, 2]] * 2


def eos_model(eos_id, eos_positions):
    """Token 1 + (i % 7) everywhere with logit 2, except that `eos_positions` predict `eos_id`
    with logit 8 (the most confident)."""

    def model_fn(ids, attention_mask):
        B, L = ids.shape
        logits = torch.zeros(B, L, VOCAB)
        pos = torch.arange(L)
        logits[:, pos, 1 + pos % 7] = 2.0
        logits[:, eos_positions, eos_id] = 8.0
        return logits

    return model_fn


def test_eos_delay_reveals_eos_last_in_block(prompt):
    eos_id = PAD_ID - 1
    eos_positions = [P + 0, P + 1, P + 5]  # two in block 0, one in block 1
    model_fn = eos_model(eos_id, eos_positions)
    base = SamplerConfig(gen_length=8, steps=8, block_length=4, stop_at_eos=False)  # one token per step
    allow, delay = Steps(), Steps()
    generate(model_fn, prompt, base, mask_id=MASK_ID, eos_ids=[eos_id], on_step=allow)
    out = generate(model_fn, prompt, base.replace(eos="delay"), mask_id=MASK_ID, eos_ids=[eos_id], on_step=delay)
    # allow: the confident EOS go first; ties among the rest leftmost first.
    assert allow.reveal_step[0, P:].tolist() == [0, 1, 2, 3, 5, 4, 6, 7]
    # delay: EOS only after every other position of the same block.
    assert delay.reveal_step[0, P:].tolist() == [2, 3, 0, 1, 4, 7, 5, 6]
    assert (out[:, eos_positions] == eos_id).all()


def test_eos_forbid_never_outputs_eos(model, prompt):
    base = SamplerConfig(gen_length=16, steps=8, block_length=8, temperature=1.0)
    g = lambda: torch.Generator().manual_seed(5)
    allowed = generate(fn(model), prompt, base, mask_id=MASK_ID, generator=g())
    eos_ids = most_common(allowed[:, P:], 3)
    forbidden = generate(fn(model), prompt, base.replace(eos="forbid"), mask_id=MASK_ID, eos_ids=eos_ids,
                         generator=g())
    assert torch.isin(allowed[:, P:], torch.tensor(eos_ids)).any()
    assert not torch.isin(forbidden[:, P:], torch.tensor(eos_ids)).any()
    assert not (forbidden == MASK_ID).any()


def test_mask_token_is_never_predicted(prompt):
    def mask_loving(ids, attention_mask):
        return torch.zeros(*ids.shape, VOCAB).index_fill(-1, torch.tensor([MASK_ID]), 9.0)

    out = generate(mask_loving, prompt, SamplerConfig(gen_length=4, steps=2), mask_id=MASK_ID)
    assert not (out[:, P:] == MASK_ID).any()


# --- padding and batching -------------------------------------------------------------------


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_left_padding_matches_unpadded_row(model, prompt, cfg_scale):
    cfg = SamplerConfig(gen_length=8, steps=4, block_length=4, cfg_scale=cfg_scale)
    short = prompt[1:, 2:]  # row 1 with a 3-token prompt
    batch = torch.cat([prompt[:1], torch.cat([torch.full((1, 2), PAD_ID), short], dim=1)])
    attention_mask = torch.ones_like(batch)
    attention_mask[1, :2] = 0
    out = generate(fn(model), batch, cfg, mask_id=MASK_ID, attention_mask=attention_mask)
    alone_short = generate(fn(model), short, cfg, mask_id=MASK_ID)
    alone_full = generate(fn(model), prompt[:1], cfg, mask_id=MASK_ID)
    assert torch.equal(out[1, 2:], alone_short[0])
    assert torch.equal(out[0], alone_full[0])
    assert torch.equal(out[1, :2], torch.full((2,), PAD_ID))


# --- randomness -----------------------------------------------------------------------------


@pytest.mark.parametrize("temperature,remasking", [(1.0, "low_confidence"), (0.0, "random"), (0.8, "random")])
def test_same_seed_same_output(model, prompt, temperature, remasking):
    cfg = SamplerConfig(gen_length=16, steps=8, block_length=8, temperature=temperature, remasking=remasking)

    def run(seed):
        rec = Steps()
        out = generate(fn(model), prompt, cfg, mask_id=MASK_ID, generator=torch.Generator().manual_seed(seed),
                       on_step=rec)
        return out, rec.reveal_step

    (a, ra), (b, rb), (c, rc) = run(0), run(0), run(1)
    assert torch.equal(a, b) and torch.equal(ra, rb)
    assert not torch.equal(ra, rc)  # a different seed gives a different reveal order (random) ...
    if temperature > 0:
        assert not torch.equal(a, c)  # ... and different tokens when sampling


# --- validation -----------------------------------------------------------------------------


def test_sampler_config_validation_messages():
    with pytest.raises(ConfigError, match=r"^gen_length \(10\) must be divisible by block_length \(4\)$"):
        SamplerConfig(gen_length=10, steps=10, block_length=4)
    with pytest.raises(ConfigError, match=r"^steps \(6\) must be divisible by the number of blocks \(4\)$"):
        SamplerConfig(gen_length=16, steps=6, block_length=4)
    with pytest.raises(ConfigError, match=r"^steps \(20\) must be <= gen_length \(16\)$"):
        SamplerConfig(gen_length=16, steps=20)
    with pytest.raises(ConfigError, match="steps must be > 0, got 0"):
        SamplerConfig(steps=0)
    with pytest.raises(ConfigError, match="temperature must be >= 0, got -0.1"):
        SamplerConfig(temperature=-0.1)
    for bad in (float("nan"), float("inf"), "1", True):
        with pytest.raises(ConfigError, match="cfg_scale must be a finite number"):
            SamplerConfig(cfg_scale=bad)
        with pytest.raises(ConfigError, match="temperature must be a finite number"):
            SamplerConfig(temperature=bad)
    with pytest.raises(ConfigError, match="remasking must be one of 'low_confidence', 'random'.*, got 'greedy'"):
        SamplerConfig(remasking="greedy")
    with pytest.raises(ConfigError, match="eos must be one of 'allow', 'forbid', 'delay', got 'never'"):
        SamplerConfig(eos="never")
    with pytest.raises(ConfigError, match="gen_length must be an integer, got 8.0"):
        SamplerConfig(gen_length=8.0)


def test_sampler_config_derived_and_round_trip():
    cfg = SamplerConfig(gen_length=12, steps=6, block_length=4, temperature=0.5, eos="delay")
    assert (cfg.num_blocks, cfg.steps_per_block) == (3, 2)
    assert SamplerConfig(gen_length=12, steps=6).num_blocks == 1
    assert SamplerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown sampler config key.*: colour"):
        SamplerConfig.from_dict({**cfg.to_dict(), "colour": 1}, where="sampler config")


def test_generate_rejects_bad_inputs(prompt):
    cfg = SamplerConfig(gen_length=4, steps=2)
    flat = lambda ids, attention_mask: torch.zeros(*ids.shape, VOCAB)
    with pytest.raises(RemaskError, match="2-D"):
        generate(flat, prompt[0], cfg, mask_id=MASK_ID)
    with pytest.raises(RemaskError, match="attention_mask shape"):
        generate(flat, prompt, cfg, mask_id=MASK_ID, attention_mask=torch.ones(2, P + 1))
    bad = prompt.clone()
    bad[0, 2] = MASK_ID
    with pytest.raises(RemaskError, match="mask token"):
        generate(flat, bad, cfg, mask_id=MASK_ID)
    attention_mask = torch.ones_like(prompt)
    attention_mask[0, :3] = 0  # the same mask id at a padded position is fine
    generate(flat, bad, cfg, mask_id=MASK_ID, attention_mask=attention_mask)
    with pytest.raises(RemaskError, match="vocabulary"):
        generate(flat, prompt, cfg.replace(eos="forbid"), mask_id=MASK_ID, eos_ids=[VOCAB])


# --- an answer anchored to end within the canvas ---------------------------------------------


def test_anchor_eos_is_seen_from_the_first_step_and_ends_the_answer(prompt):
    eos_id = PAD_ID - 1
    seen = []
    inner = eos_model(eos_id, [])  # never predicts an end-of-text itself

    def model_fn(ids, attention_mask):
        seen.append(ids.clone())
        return inner(ids, attention_mask)

    base = SamplerConfig(gen_length=8, steps=8, block_length=4)
    steps = Steps()
    out = generate(model_fn, prompt, base.replace(anchor_eos=True), mask_id=MASK_ID, eos_ids=[eos_id], on_step=steps)
    assert (seen[0][:, -1] == eos_id).all() and (seen[0][:, P:-1] == MASK_ID).all()  # the first pass sees it
    assert (out[:, -1] == eos_id).all() and not (out[:, P:-1] == eos_id).any()
    assert (steps.reveal_step[:, -1] == -1).all()  # given, not revealed
    assert answers_ended(out, P, torch.tensor([eos_id]), MASK_ID).all()
    free = generate(inner, prompt, base, mask_id=MASK_ID, eos_ids=[eos_id])
    assert not answers_ended(free, P, torch.tensor([eos_id]), MASK_ID).any()  # without it: cut at the limit


def test_anchored_answer_is_the_infilling_of_a_canvas_ending_in_eos(model, prompt):
    """Oracle: one block with the anchor is infilling prompt + masks + end-of-text (fill_masks)."""
    eos_id = PAD_ID - 1
    sampler = SamplerConfig(gen_length=10, steps=9, anchor_eos=True, stop_at_eos=False)
    out = generate(fn(model), prompt, sampler, mask_id=MASK_ID, eos_ids=[eos_id])
    canvas = torch.cat([prompt, torch.full((2, 9), MASK_ID), torch.full((2, 1), eos_id)], dim=1)
    assert torch.equal(out, fill_masks(fn(model), canvas, sampler, mask_id=MASK_ID))


def test_anchor_eos_needs_an_end_of_text(model, prompt):
    with pytest.raises(RemaskError, match="anchor_eos needs an end-of-text"):
        generate(fn(model), prompt, SamplerConfig(gen_length=4, steps=4, anchor_eos=True), mask_id=MASK_ID)
    with pytest.raises(ConfigError, match="eos forbid"):
        SamplerConfig(gen_length=4, steps=4, anchor_eos=True, eos="forbid")
    with pytest.raises(ConfigError, match="gen_length >= 2"):
        SamplerConfig(gen_length=1, steps=1, anchor_eos=True)


# --- ending at the end-of-text ------------------------------------------------------------


def test_stops_once_every_answer_has_ended(prompt):
    eos_id = PAD_ID - 1
    calls = []
    inner = eos_model(eos_id, [P + 5])

    def model_fn(ids, attention_mask):
        calls.append(1)
        return inner(ids, attention_mask)

    base = SamplerConfig(gen_length=8, steps=8, block_length=4)  # one token per step
    full = generate(model_fn, prompt, base.replace(stop_at_eos=False), mask_id=MASK_ID, eos_ids=[eos_id])
    assert len(calls) == 8
    calls.clear()
    steps = Steps()
    out = generate(model_fn, prompt, base, mask_id=MASK_ID, eos_ids=[eos_id], on_step=steps)
    # Step 4 reveals the EOS at P+5 (most confident), step 5 the position before it: then it has ended.
    assert len(calls) == 6 and [i.step for i in steps] == [0, 1, 2, 3, 4, 5]
    assert [i.done for i in steps] == [False] * 5 + [True]
    assert torch.equal(out[:, : P + 6], full[:, : P + 6])  # the answer up to its end is unchanged
    assert (out[:, P + 6:] == MASK_ID).all()
    assert answers_ended(out, P, torch.tensor([eos_id]), MASK_ID).all()
    assert steps[-1].answer(0) == (out[0, P:].tolist(), steps.reveal_step[0, P:].tolist())


def test_one_unfinished_row_keeps_the_batch_going(prompt):
    eos_id = PAD_ID - 1
    inner = eos_model(eos_id, [P + 5])

    def model_fn(ids, attention_mask):  # row 1 never predicts the EOS
        logits = inner(ids, attention_mask)
        logits[1, :, eos_id] = -9.0
        return logits

    out = generate(model_fn, prompt, SamplerConfig(gen_length=8, steps=8, block_length=4), mask_id=MASK_ID,
                   eos_ids=[eos_id])
    assert not (out == MASK_ID).any()
    ended = answers_ended(out, P, torch.tensor([eos_id]), MASK_ID)
    assert ended.tolist() == [True, False]


def test_answers_ended_by_hand():
    M, E = MASK_ID, 3
    x = torch.tensor([[9, 1, E, M],   # ended: EOS with everything before it revealed
                      [9, M, E, 2],   # not: a mask before the EOS
                      [9, 1, 2, 2],   # not: no EOS
                      [9, E, M, M]])  # ended at once
    assert answers_ended(x, 1, torch.tensor([E]), M).tolist() == [True, False, False, True]


def test_fill_masks_in_a_region_leaves_the_other_masks_as_context(model, prompt):
    """Oracle: a hand loop that, once per step, reveals the single most confident masked position
    inside the region (greedy, mask token excluded) on the full sequence, padding masks included."""
    x = torch.cat([prompt, torch.full((2, 5), MASK_ID), prompt[:, :2], torch.full((2, 7), MASK_ID)], dim=1)
    region = slice(P, P + 5)
    out = fill_masks(fn(model), x, SamplerConfig(gen_length=5, steps=5), mask_id=MASK_ID, region=region)
    ref = x.clone()
    with torch.no_grad():
        for _ in range(5):
            probs = fn(model)(ref, None).double().softmax(-1)
            probs[..., MASK_ID] = 0
            conf, best = probs.max(-1)
            conf[:, :P] = conf[:, P + 5:] = -1
            conf[ref != MASK_ID] = -1
            j = conf.argmax(1)
            rows = torch.arange(2)
            ref[rows, j] = best[rows, j]
    assert torch.equal(out, ref)
    assert (out[:, P + 7:] == MASK_ID).all() and not (out[:, region] == MASK_ID).any()
    assert torch.equal(out[:, :P], prompt)
