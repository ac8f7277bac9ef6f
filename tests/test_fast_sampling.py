"""The fast sampler against the reference: the lossless paths token for token, the cache mechanism
exact when fresh, the parallel rules' invariants, batching against one-by-one, and the AR twin's
cached decoding against its uncached one."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from remask.model import build_model
from remask.sampling import SamplerConfig, StepInfo, ar_generate, generate
from remask.sampling.autoregressive import ar_generate_cached
from remask.sampling.engine import fill_masks_fast, generate_fast, reveal_counts

V = 32
MASK = V - 1
PAD = V - 2
EOS = V - 3
P = 5


@pytest.fixture(scope="module")
def model():
    # float64 with a wide init: predictions depend on context and no argmax flips by rounding
    return build_model(tiny_config(V, max_sequence_length=64, init_std=0.3), seed=3, dtype=torch.float64).eval()


@pytest.fixture(scope="module")
def ar_model():
    return build_model(tiny_config(V, max_sequence_length=64, init_std=0.3, attention="causal"), seed=3,
                       dtype=torch.float64).eval()


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, EOS, (3, P), generator=torch.Generator().manual_seed(11))


def reference(model, prompt, sampler, **kw):
    return generate(lambda ids, attention_mask: model(ids, attention_mask), prompt, sampler, mask_id=MASK, **kw)


LOSSLESS = [
    SamplerConfig(gen_length=16, steps=16, block_length=4),
    SamplerConfig(gen_length=12, steps=6, block_length=4, remasking="margin"),
    SamplerConfig(gen_length=16, steps=4, block_length=8, remasking="entropy"),
    SamplerConfig(gen_length=16, steps=8, cfg_scale=1.0),
    SamplerConfig(gen_length=12, steps=12, block_length=6, eos="delay", stop_at_eos=False),
    SamplerConfig(gen_length=12, steps=12, block_length=6, eos="forbid"),
    SamplerConfig(gen_length=12, steps=12, block_length=4, anchor_eos=True),
    SamplerConfig(gen_length=6, steps=6, block_length=1, anchor_eos=True),  # the last block is the anchor alone
]


@pytest.mark.parametrize("sampler", LOSSLESS, ids=lambda s: f"{s.gen_length}-{s.steps}-{s.block_length}-{s.remasking}")
def test_lossless_path_is_token_identical_to_the_reference(model, prompt, sampler):
    fast, stats = generate_fast(model, prompt, sampler, mask_id=MASK, vocab_size=V, eos_ids=[EOS])
    ref = reference(model, prompt, sampler, eos_ids=[EOS])
    for f, r in zip(fast.tolist(), ref.tolist()):  # each answer up to its end-of-text; after it the fast
        end = f.index(EOS, P) + 1 if sampler.stop_at_eos and EOS in f[P:] else len(f)  # path computes nothing
        assert f[:end] == r[:end]
    assert stats.forward_passes <= sampler.steps


def test_one_forward_pass_per_step_and_none_more(model, prompt):
    calls = []

    def counting(ids, attention_mask=None, positions=None, **kw):
        calls.append(ids.shape)
        return model(ids, attention_mask, positions, **kw)

    sampler = SamplerConfig(gen_length=8, steps=4, block_length=4)
    out, stats = generate_fast(counting, prompt, sampler, mask_id=MASK, vocab_size=V)
    assert len(calls) == stats.forward_passes == 4 and torch.equal(out, reference(model, prompt, sampler))


def test_finished_rows_leave_the_batch_and_sampling_stops(model, prompt):
    # A model that predicts EOS at answer position 2 of row 0 only, with full confidence.
    rows_seen = []

    def eos_in_row0(ids, attention_mask=None, positions=None, **kw):
        rows_seen.append(ids.shape[0])
        out = model(ids, attention_mask, positions, **kw)
        logits = out if not isinstance(out, tuple) else out[0]
        if ids.shape[0] == 3:
            logits[0, :, EOS] = 50.0
        return out

    sampler = SamplerConfig(gen_length=8, steps=8, block_length=8)
    out, stats = generate_fast(eos_in_row0, prompt, sampler, mask_id=MASK, vocab_size=V, eos_ids=[EOS])
    assert rows_seen[0] == 3 and rows_seen[-1] == 2  # row 0 ended at its first step and left
    assert out[0, P] == EOS and (out[0, P + 1:] == MASK).all()  # the rest of its answer was never computed
    assert not (out[1:, P:] == MASK).any()


def test_cache_is_exact_when_fresh(model, prompt):
    """The dual and prefix cache mechanism: the block's logits from keys/values computed by a full
    pass over the same sequence equal that full pass's logits."""
    x = torch.cat([prompt, torch.full((3, 12), MASK)], dim=1)
    x[:, P + 4:P + 6] = 7  # something revealed in the block
    block = slice(P + 4, P + 8)
    full, kv = model(x, return_kv=True)
    L = x.shape[1]
    outside = torch.cat([torch.arange(0, block.start), torch.arange(block.stop, L)])
    dual = model(x[:, block], None, torch.arange(block.start, block.stop), past=kv.positions(outside))
    prefix = model(x[:, block.start:], None, torch.arange(block.start, L), past=kv.positions(slice(0, block.start)),
                   logits_at=slice(0, 4))
    torch.testing.assert_close(dual, full[:, block], atol=1e-10, rtol=0)
    torch.testing.assert_close(prefix, full[:, block], atol=1e-10, rtol=0)
    assert torch.equal(model(x, logits_at=block), full[:, block])


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cached_first_step_of_every_block_equals_the_uncached_one(model, prompt, cache):
    """At each block's first step the cache has just been refreshed: its logits are the uncached ones
    on the same sequence (tolerance 1e-10 in float64). At the block's later steps the cached keys
    and values are stale by what the block revealed since: the logits differ."""
    sampler = SamplerConfig(gen_length=12, steps=12, block_length=4, cache=cache)
    infos: list[StepInfo] = []
    logits_seen = []

    def spy(ids, attention_mask=None, positions=None, **kw):
        out = model(ids, attention_mask, positions, **kw)
        logits_seen.append(out if not isinstance(out, tuple) else out[0])
        return out

    one = prompt[:1]
    generate_fast(spy, one, sampler, mask_id=MASK, vocab_size=V, on_step=infos.append)
    assert len(logits_seen) == 12  # one token per step, one pass each
    state = torch.cat([one, torch.full((1, 12), MASK)], dim=1)  # the sequence each pass saw
    for step, (logits, info) in enumerate(zip(logits_seen, infos)):
        block = slice(P + 4 * info.block, P + 4 * info.block + 4)
        uncached = model(state, logits_at=block)
        if step % 4 == 0:
            torch.testing.assert_close(logits, uncached, atol=1e-10, rtol=0)
        else:
            assert (logits - uncached).abs().max() > 1e-6
        state = info.x.clone()


@pytest.mark.parametrize("rule", ["threshold", "factor", "entropy"])
@pytest.mark.parametrize("cache", ["none", "dual"])
def test_parallel_rules_reveal_at_least_one_and_stay_in_the_block(model, prompt, rule, cache):
    sampler = SamplerConfig(gen_length=16, steps=16, block_length=4, parallel=rule, cache=cache, threshold=0.3,
                            factor=2.0, entropy_bound=1.0)
    for row in range(3):
        infos: list[StepInfo] = []
        out, stats = generate_fast(model, prompt[row:row + 1], sampler, mask_id=MASK, vocab_size=V,
                                   on_step=infos.append)
        before = torch.cat([prompt[row:row + 1], torch.full((1, 16), MASK)], dim=1)
        for info in infos:
            lo = P + 4 * (info.step // 4)  # the block this step belongs to
            assert info.revealed.sum() >= 1  # at least one token per step
            assert not info.revealed[:, :lo].any() and not info.revealed[:, lo + 4:].any()  # only the current block
            assert (before[info.revealed] == MASK).all()
            before = info.x.clone()
        assert not (out[:, P:] == MASK).any() and stats.forward_passes == len(infos) <= 16


def test_reveal_counts_by_hand():
    masked = torch.tensor([[True, True, True, True]])
    conf = torch.tensor([[0.95, 0.5, 0.92, 0.2]], dtype=torch.float64)
    ent = torch.tensor([[0.1, 0.3, 0.2, 0.9]], dtype=torch.float64)
    one = torch.tensor([1])
    sampler = SamplerConfig(parallel="threshold", threshold=0.9)
    assert reveal_counts(conf, ent, masked, sampler, one).tolist() == [2]
    # factor 1: n=1: 2 * 0.05 = 0.1 < 1; n=2: 3 * 0.08 = 0.24 < 1; n=3: 4 * 0.5 = 2 >= 1 -> 2
    assert reveal_counts(conf, ent, masked, sampler.replace(parallel="factor", factor=1.0), one).tolist() == [2]
    # entropy 0.35: sorted .1 .2 .3 .9: sums minus max: 0, .1, .3, .6 -> 3
    assert reveal_counts(conf, ent, masked, sampler.replace(parallel="entropy", entropy_bound=0.35), one).tolist() == [3]
    assert reveal_counts(conf * 0, ent, masked, sampler, one).tolist() == [1]  # never fewer than one
    assert reveal_counts(conf, ent, masked, sampler, torch.tensor([3])).tolist() == [3]  # the step budget's minimum


@pytest.mark.parametrize("sampler", [SamplerConfig(gen_length=8, steps=8, block_length=4),
                                     SamplerConfig(gen_length=8, steps=8, block_length=4, cache="dual", parallel="threshold",
                                                   threshold=0.3),
                                     SamplerConfig(gen_length=8, steps=8, block_length=4, cache="prefix")])
def test_batched_answers_equal_one_by_one(model, sampler):
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, EOS, (n,), generator=g) for n in (2, 5, 3, 7)]
    width = max(len(p) for p in prompts)
    ids = torch.full((4, width), PAD)
    attention = torch.zeros(4, width, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):], attention[r, width - len(p):] = p, 1
    batch, _ = generate_fast(model, ids, sampler, mask_id=MASK, vocab_size=V, attention_mask=attention, eos_ids=[EOS])
    for r, p in enumerate(prompts):
        alone, _ = generate_fast(model, p[None], sampler, mask_id=MASK, vocab_size=V, eos_ids=[EOS])
        assert torch.equal(batch[r, width - len(p):], alone[0])


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_ar_cached_decoding_equals_uncached(ar_model, prompt, temperature):
    """The uncached decoding is the oracle: with the same generator, both draw the same Gumbel noise
    (B, 1, V) at each step as long as no row leaves the batch, so they agree token for token when
    sampling too: a padded batch that never stops, and each row alone with its end-of-text."""
    fn = lambda ids, attention_mask: ar_model(ids, attention_mask)  # noqa: E731
    padded = prompt.clone()
    padded[1, :2] = PAD
    attention = torch.ones_like(prompt)
    attention[1, :2] = 0

    def both(ids, mask, eos_ids, seed=4):
        ref = ar_generate(fn, ids, 12, eos_ids=eos_ids, attention_mask=mask, temperature=temperature,
                          generator=torch.Generator().manual_seed(seed))
        fast, passes = ar_generate_cached(ar_model, ids, 12, vocab_size=V, eos_ids=eos_ids, attention_mask=mask,
                                          temperature=temperature, generator=torch.Generator().manual_seed(seed))
        return ref, fast, passes

    ref, fast, passes = both(padded, attention, [EOS])
    if temperature == 0:  # greedy: rows leaving the batch change nothing
        assert torch.equal(ref, fast) and passes == ref.shape[1] - P
    ref, fast, passes = both(padded, attention, [])  # nobody stops, nobody leaves
    assert torch.equal(ref, fast) and passes == 12
    for r in range(prompt.shape[0]):
        ids = prompt[r:r + 1, 2:] if r == 1 else prompt[r:r + 1]  # row 1 without its padding
        for seed in (4, 5):
            ref, fast, _ = both(ids, None, [EOS], seed)
            assert torch.equal(ref, fast)
    if temperature > 0:  # and the temperature is used: the samples are not the greedy answers
        greedy = ar_generate(fn, padded, 12, attention_mask=attention)
        assert not torch.equal(both(padded, attention, [])[1], greedy)


def test_rows_that_join_later_get_the_answers_they_get_alone(model):
    from remask.sampling.engine import Engine

    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(0, EOS, (n,), generator=g) for n in (4, 7, 2)]
    samplers = [SamplerConfig(gen_length=12, steps=12, block_length=4),
                SamplerConfig(gen_length=8, steps=8, block_length=4, cache="dual", parallel="threshold", threshold=0.2),
                SamplerConfig(gen_length=8, steps=4, cache="prefix")]

    def alone(i):
        engine = Engine(model, mask_id=MASK, vocab_size=V, eos_ids=[EOS])
        row = engine.add(prompts[i], samplers[i])
        engine.run()
        return row.seq.tolist()

    engine = Engine(model, mask_id=MASK, vocab_size=V, eos_ids=[EOS])
    rows = [engine.add(prompts[0], samplers[0])]
    engine.step()
    engine.step()
    rows.append(engine.add(prompts[1], samplers[1]))  # joins mid-block of the first
    engine.step()
    rows.append(engine.add(prompts[2], samplers[2]))
    finished = []
    while engine.active:
        finished += engine.step()
    assert {id(r.row) for r in finished} | {id(rows[0])} >= {id(r) for r in rows[1:]}
    assert [r.seq.tolist() for r in rows] == [alone(i) for i in range(3)]


def infill_case(n_rows=3):
    """Rows of text, a masked region inside, text after it and masks up to the end (never revealed)."""
    g = torch.Generator().manual_seed(13)
    x = torch.randint(0, EOS, (n_rows, 20), generator=g)
    region = slice(4, 10)
    x[:, region] = MASK
    x[:, 16:] = MASK  # the window's padding: context, never revealed
    return x, region


@pytest.mark.parametrize("steps", [6, 3])
def test_fast_infilling_is_token_identical_to_fill_masks(model, steps):
    from remask.sampling.generate import fill_masks

    x, region = infill_case()
    sampler = SamplerConfig(gen_length=6, steps=steps)
    ref = fill_masks(lambda ids, attention_mask: model(ids, attention_mask), x, sampler, mask_id=MASK, region=region)
    fast, stats = fill_masks_fast(model, x, region, sampler, mask_id=MASK, vocab_size=V)
    assert torch.equal(fast, ref)
    assert stats.forward_passes == steps


@pytest.mark.parametrize("sampler", [
    SamplerConfig(gen_length=6, steps=6, block_length=2, cache="dual", parallel="threshold", threshold=0.5),
    SamplerConfig(gen_length=6, steps=6, block_length=3, cache="prefix", parallel="factor", factor=1.0),
])
def test_fast_infilling_reveals_the_region_only(model, sampler):
    x, region = infill_case()
    out, _ = fill_masks_fast(model, x, region, sampler, mask_id=MASK, vocab_size=V)
    outside = torch.ones(x.shape[1], dtype=torch.bool)
    outside[region] = False
    assert torch.equal(out[:, outside], x[:, outside])  # text and the padding masks untouched
    assert not (out[:, region] == MASK).any()


def test_infill_rejects_a_region_that_does_not_fit(model):
    from remask.errors import RemaskError
    from remask.sampling.engine import Engine

    x, region = infill_case(1)
    engine = Engine(model, mask_id=MASK, vocab_size=V)
    with pytest.raises(RemaskError, match="gen_length"):
        engine.add_infill(x[0], region, SamplerConfig(gen_length=8, steps=8))
    with pytest.raises(RemaskError, match="region"):
        engine.add_infill(x[0], slice(18, 30), SamplerConfig(gen_length=12, steps=12))
