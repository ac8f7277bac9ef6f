"""The fast engine's pieces: the cache protocol (what each pass recomputes, reuses and keeps) on
hand-built rows, the scheduler's choice, the batched cache kept between steps, a batch of cached
rows against each row alone and the reference sampler, a third kind of pass plugging in, and the
context check in `Engine.add`."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_config

from remask.errors import RemaskError
from remask.model import build_model
from remask.sampling import SamplerConfig, generate
from remask.sampling.engine import PASSES, Engine, PassSpec, Row, generate_fast, scheduler
from remask.sampling.engine.rows import SamplingStats
from remask.sampling.engine.runner import Runner

V = 32
MASK = V - 1
EOS = V - 3


def hand_row(cache: str, block: int = 1) -> Row:
    """4 prompt tokens, then 3 blocks of 4 answer positions (4:8, 8:12, 12:16), at `block`."""
    seq = torch.cat([torch.arange(4), torch.full((12,), MASK)])
    row = Row(seq, 4, SamplerConfig(gen_length=12, steps=12, block_length=4, cache=cache), None,
              torch.tensor([EOS]), reveal_step=torch.full((16,), -1))
    row.blocks, row.block = [slice(4, 8), slice(8, 12), slice(12, 16)], block
    return row


def test_each_pass_says_what_it_recomputes_reuses_and_keeps():
    full, cached = PASSES["full"], PASSES["cached"]
    assert full.spec(hand_row("none")) == PassSpec(recompute=(slice(0, 16),), reuse=(), logits=slice(8, 12), keep=())
    # a caching row's full pass keeps every position's keys/values: they are the block's cache
    assert full.spec(hand_row("dual")) == PassSpec(recompute=(slice(0, 16),), reuse=(), logits=slice(8, 12),
                                                   keep=(slice(0, 16),))
    # prefix: the block and everything after it recomputed, the prompt and finished block reused
    assert cached.spec(hand_row("prefix")) == PassSpec(recompute=(slice(8, 16),), reuse=(slice(0, 8),),
                                                       logits=slice(8, 12))
    # dual: the block alone recomputed, both sides reused
    assert cached.spec(hand_row("dual")) == PassSpec(recompute=(slice(8, 12),), reuse=(slice(0, 8), slice(12, 16)),
                                                     logits=slice(8, 12))
    assert cached.spec(hand_row("dual", block=2)).reuse == (slice(0, 12), slice(16, 16))  # nothing after the last block


def test_a_pass_spec_that_breaks_the_protocol_is_refused():
    with pytest.raises(ValueError, match="both recomputed and reused"):
        PassSpec(recompute=(slice(8, 12),), reuse=(slice(0, 9),), logits=slice(8, 12))
    with pytest.raises(ValueError, match="recomputed positions"):
        PassSpec(recompute=(slice(8, 12),), reuse=(slice(0, 8),), logits=slice(4, 8))
    with pytest.raises(ValueError, match="recomputed positions"):
        PassSpec(recompute=(slice(8, 12),), reuse=(slice(0, 8),), logits=slice(8, 12), keep=(slice(0, 12),))


def test_the_scheduler_refreshes_a_cache_then_reuses_it():
    none, dual, prefix = hand_row("none"), hand_row("dual"), hand_row("prefix")
    prefix.fresh = True
    assert scheduler.plan([none, dual, prefix], list(PASSES)) == {"full": [none, dual], "cached": [prefix]}
    none.fresh = True  # a row without a cache never takes a cached pass
    assert scheduler.pass_kind(none) == "full"


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config(V, max_sequence_length=64, init_std=0.3), seed=3, dtype=torch.float64).eval()


@pytest.fixture(scope="module")
def one_layer():
    """One layer: every position's keys/values are a function of its token and position alone, so
    a cache of positions whose tokens have not changed is exact, and cached sampling must give
    the reference sampler's tokens."""
    return build_model(tiny_config(V, max_sequence_length=64, init_std=0.3, n_layers=1), seed=5,
                       dtype=torch.float64).eval()


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_a_cached_pass_reads_the_reused_positions_from_the_full_pass_cache(model, cache):
    """Right after the full pass, nothing has changed: the cached pass, built from its spec alone,
    gives the full pass's logits of the block."""
    row = hand_row(cache)
    row.seq[4:6] = torch.tensor([7, 9])
    runner = Runner(model, mask_id=MASK, stats=SamplingStats())
    full = runner.run({"full": [row]})[id(row)]
    assert row.fresh and row.cache.length == 16
    cached = runner.run({"cached": [row]})[id(row)]
    assert row.past.length == {"prefix": 8, "dual": 12}[cache]
    torch.testing.assert_close(cached, full, atol=1e-10, rtol=0)


def prompts_of(lengths, seed=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, EOS, (n,), generator=g) for n in lengths]


def test_a_batch_of_cached_rows_equals_each_row_alone_and_the_reference(one_layer):
    prompts = prompts_of((3, 6, 4, 5))
    samplers = [SamplerConfig(gen_length=12, steps=12, block_length=4, cache=c) for c in ("dual", "prefix", "dual", "prefix")]
    cached_calls = []

    def counting(ids, attention_mask=None, positions=None, **kw):
        cached_calls.append(kw.get("past") is not None and ids.shape[0])
        return one_layer(ids, attention_mask, positions, **kw)

    engine = Engine(counting, mask_id=MASK, vocab_size=V)
    rows = [engine.add(p, s) for p, s in zip(prompts, samplers)]
    engine.run()
    assert cached_calls.count(4) == 9  # 3 blocks of 4 steps: one full pass, then 3 cached passes of all 4 rows
    fn = lambda ids, attention_mask: one_layer(ids, attention_mask)  # noqa: E731
    for p, s, row in zip(prompts, samplers, rows):
        alone = Engine(one_layer, mask_id=MASK, vocab_size=V)
        single = alone.add(p, s)
        alone.run()
        assert row.seq.tolist() == single.seq.tolist()
        assert row.seq.tolist() == generate(fn, p[None], s.replace(cache="none"), mask_id=MASK)[0].tolist()


def test_the_batched_cache_is_stacked_once_while_its_rows_do_not_change(model):
    pasts = []

    def spy(ids, attention_mask=None, positions=None, **kw):
        pasts.append(kw.get("past"))
        return model(ids, attention_mask, positions, **kw)

    sampler = SamplerConfig(gen_length=8, steps=8, block_length=4, cache="dual")
    engine = Engine(spy, mask_id=MASK, vocab_size=V)
    first = [engine.add(p, sampler) for p in prompts_of((3, 5))]
    for _ in range(3):  # the first block: a full pass, then two cached ones
        engine.step()
    assert pasts[0] is None and pasts[1] is pasts[2] is not None and pasts[1].layers[0][0].shape[0] == 2
    late = engine.add(prompts_of((4,))[0], sampler)
    engine.step()  # the newcomer's full pass; the two others' cached pass with the same batch
    assert pasts[3] is None and pasts[4] is pasts[2]
    engine.step()  # first block ends for the two; the newcomer's first cached pass: the batch changed
    assert pasts[-1] is not pasts[2] and pasts[-1].layers[0][0].shape[0] == 1
    engine.remove(late)
    engine.run()
    assert not engine.runner.held  # nothing held once nobody takes a cached pass
    alone = Engine(model, mask_id=MASK, vocab_size=V)
    again = [alone.add(p, sampler) for p in prompts_of((3, 5))]
    alone.run()
    assert [r.seq.tolist() for r in first] == [r.seq.tolist() for r in again]


def test_a_third_kind_of_pass_plugs_in_without_touching_the_engine(model, monkeypatch):
    """A kind registered with the runner and named by a scheduler rule runs its rows; the engine's
    step is unchanged (here a kind that does what the full pass does, and counts its rows)."""
    seen = []

    class Counting:
        name = "counting"

        def spec(self, row):
            return PASSES["full"].spec(row)

        def run(self, rows, runner):
            seen.append(len(rows))
            return PASSES["full"].run(rows, runner)

    monkeypatch.setitem(PASSES, "counting", Counting())
    monkeypatch.setitem(scheduler.RULES, "none", lambda row: "counting")
    prompt = torch.stack(prompts_of((5, 5)))
    sampler = SamplerConfig(gen_length=8, steps=8, block_length=4)
    out, stats = generate_fast(model, prompt, sampler, mask_id=MASK, vocab_size=V)
    assert seen == [2] * 8 and stats.forward_passes == 8
    assert torch.equal(out, generate(lambda ids, attention_mask: model(ids, attention_mask), prompt, sampler, mask_id=MASK))


def test_engine_add_refuses_a_prompt_beyond_the_context():
    calls = []
    mock = lambda *a, **kw: calls.append(a)  # noqa: E731  (never called: the check comes first)
    mock.config = SimpleNamespace(max_sequence_length=16)
    engine = Engine(mock, mask_id=MASK, vocab_size=V)
    with pytest.raises(RemaskError, match="exceeds the model's context of 16 tokens"):
        engine.add(list(range(9)), SamplerConfig(gen_length=8, steps=8))
    engine.add(list(range(8)), SamplerConfig(gen_length=8, steps=8))  # exactly the context: accepted
    assert engine.active == 1
    explicit = Engine(mock, mask_id=MASK, vocab_size=V, max_length=10)
    with pytest.raises(RemaskError, match="context of 10 tokens"):
        explicit.add([1, 2, 3], SamplerConfig(gen_length=8, steps=8))
    assert not calls


@pytest.mark.parametrize("settings", [
    {}, {"parallel": "threshold", "threshold": 0.3}, {"parallel": "factor", "factor": 1.0},
    {"parallel": "entropy", "entropy_bound": 0.5}, {"eos": "delay"}, {"eos": "forbid", "remasking": "margin"},
    {"temperature": 0.8}, {"remasking": "random"}])
def test_rows_revealed_together_equal_each_row_revealed_alone(model, settings):
    """`reveal_rows` over rows at different steps of their blocks (and rows of another block
    width) gives each row what it gets alone: the same reveals, sequence, reveal steps and block;
    rows drawing randomness keep to their own generators."""
    import copy

    from remask.sampling.engine.reveal import batches, reveal_rows

    V, mask = model.config.vocab_size, model.config.vocab_size - 1
    sampler = SamplerConfig(gen_length=12, steps=12, block_length=4, **settings)
    engine = Engine(model, mask_id=mask, vocab_size=V, eos_ids=[V - 2])
    rows = [engine.add(torch.arange(3 + i) % (V - 3), sampler, generator=torch.Generator().manual_seed(i))
            for i in range(4)]
    rows.append(engine.add(torch.arange(5) % (V - 3), sampler.replace(block_length=2),
                           generator=torch.Generator().manual_seed(9)))  # blocks of 2: another group
    random = settings.get("temperature", 0) > 0 or settings.get("remasking") == "random"
    assert len(batches(rows)) == (len(rows) if random else 2)
    g = torch.Generator().manual_seed(0)
    for _ in range(7):  # rows drift apart: blocks end after different numbers of steps under the parallel rules
        live = [r for r in rows if not r.finished]
        logits = {id(r): torch.randn(r.current.stop - r.current.start, V, generator=g, dtype=torch.float64) * 3
                  for r in live}
        alone = [copy.deepcopy(r) for r in live]
        for a, r in zip(alone, live):
            reveal_rows([a], {id(a): logits[id(r)]}, mask_id=mask, vocab_size=V)
        reveal_rows(live, logits, mask_id=mask, vocab_size=V)
        for a, r in zip(alone, live):
            assert torch.equal(a.seq, r.seq) and torch.equal(a.reveal_step, r.reveal_step)
            assert (a.block, a.step_in_block, a.finished) == (r.block, r.step_in_block, r.finished)
            if r.generator is not None:
                assert torch.equal(a.generator.get_state(), r.generator.get_state())
