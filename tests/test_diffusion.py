"""Diffusion math against hand computation and exact enumeration."""

from __future__ import annotations

import math

import pytest
import torch

from remask.config import ModelConfig
from remask.diffusion import (
    ar_loss,
    exact_log_likelihood_bound,
    exact_t_bound,
    forward_mask,
    mask_exactly,
    mc_log_likelihood,
    mdm_loss,
    sft_loss,
    stratified_mask_counts,
    stratified_t,
    t_bound,
)
from remask.errors import RemaskError
from remask.model import build_model

VOCAB = 16
MASK = VOCAB - 1  # the tiny test vocabulary's mask id


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------- masking


@pytest.mark.parametrize("t", [0.0, 0.02, 0.3, 0.7, 1.0])
def test_mask_rate_follows_p(t):
    eps = 1e-3
    ids = torch.zeros(3, 4096, dtype=torch.long)
    noisy, masked, p = forward_mask(ids, mask_id=MASK, eps=eps, t=torch.full((3,), t), generator=gen(0))
    expected = (1 - eps) * t + eps
    assert torch.allclose(p, torch.full((3, 1), expected))
    std = math.sqrt(4096 * expected * (1 - expected))
    for row in masked:
        assert abs(row.sum().item() - 4096 * expected) <= 4 * std + 1
    assert torch.equal(noisy == MASK, masked)


def test_drawn_t_is_uniform_and_reproducible():
    ids = torch.zeros(4000, 8, dtype=torch.long)
    a = forward_mask(ids, mask_id=MASK, generator=gen(1))
    b = forward_mask(ids, mask_id=MASK, generator=gen(1))
    assert torch.equal(a.masked, b.masked) and torch.equal(a.p, b.p)
    assert a.p.min() >= 1e-3 and abs(a.p.mean().item() - 0.5) < 0.02


def test_stratified_times_hold_one_per_stratum_and_are_each_uniform():
    B, draws = 8, 4000
    t = torch.stack([stratified_t(B, generator=gen(i)) for i in range(draws)])  # (draws, B)
    assert torch.equal(t.sort(1).values.mul(B).floor().long(), torch.arange(B).expand(draws, B))
    assert torch.equal(t[7], stratified_t(B, generator=gen(7)))
    # each row position is marginally U(0, 1): its deciles hold a tenth of the draws each
    for position in (0, B - 1):
        share = torch.bincount((t[:, position] * 10).long(), minlength=10).float() / draws
        assert (share - 0.1).abs().max() < 0.02
    a = forward_mask(torch.zeros(B, 6, dtype=torch.long), mask_id=MASK, stratified=True, generator=gen(5))
    assert torch.equal(((a.p.squeeze(1) - 1e-3) / (1 - 1e-3) * B).floor().sort().values.long(), torch.arange(B))


def test_stratified_times_give_the_same_loss_with_less_variance():
    """A model that has learned its data (the more context is visible, the surer it is of the true
    token) is scored by the training loss over many batches: the two ways of drawing t agree on the
    mean (both unbiased estimates of the bound), and the stratified one varies much less."""
    B, L = 8, 32
    ids = torch.randint(0, MASK, (B, L), generator=gen(11))

    def learned_logits(masked):
        seen = 1.0 - masked.float().mean(1, keepdim=True)  # (B, 1) share of visible context
        return 8.0 * seen[..., None] * torch.nn.functional.one_hot(ids, VOCAB).float()

    losses = {}
    for stratified in (False, True):
        draws = [forward_mask(ids, mask_id=MASK, stratified=stratified, generator=gen(100 + i)) for i in range(400)]
        losses[stratified] = torch.tensor([mdm_loss(learned_logits(m), ids, m, p).item() for _, m, p in draws])
    plain, strat = losses[False], losses[True]
    se = math.sqrt((plain.var() + strat.var()).item() / 400)
    assert abs(plain.mean().item() - strat.mean().item()) < 3 * se
    assert strat.var() < 0.5 * plain.var()


def test_maskable_region_is_respected():
    ids = torch.arange(10).repeat(200, 1)
    maskable = torch.arange(10)[None, :].expand(200, -1) >= 4
    _, masked, _ = forward_mask(ids, mask_id=MASK, maskable=maskable, generator=gen(2))
    assert not masked[:, :4].any() and masked[:, 4:].any()


def test_mask_exactly_counts_and_uniformity():
    B, T = 6000, 5
    ids = torch.zeros(B, T, dtype=torch.long)
    counts = torch.full((B,), 2)
    maskable = torch.ones(B, T, dtype=torch.bool)
    maskable[:, 0] = False
    _, masked = mask_exactly(ids, counts, mask_id=MASK, maskable=maskable, generator=gen(3))
    assert (masked.sum(1) == 2).all() and not masked[:, 0].any()
    freq = masked[:, 1:].float().mean(0)  # each of 4 positions in 2 of 4 -> 1/2
    assert torch.allclose(freq, torch.full((4,), 0.5), atol=0.03)


def test_stratified_counts():
    for L in (1, 5, 7):
        c = stratified_mask_counts(L, L, generator=gen(L))
        assert sorted(c.tolist()) == list(range(1, L + 1))
    c = stratified_mask_counts(16, 5, generator=gen(9))
    assert c.min() >= 1 and c.max() <= 5


# ----------------------------------------------------------------------------------- losses

LOGITS = torch.tensor([[[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 0.4], [1.0, -2.0, 0.5, 3.0]],
                       [[0.0, 0.0, 0.0, 0.0], [-1.0, 2.0, 1.0, 0.0], [0.3, 0.3, -0.3, 1.5]]])
TARGETS = torch.tensor([[0, 3, 2], [1, 1, 3]])


def nll(b: int, i: int) -> float:
    row = LOGITS[b, i].tolist()
    return -(row[TARGETS[b, i]] - math.log(sum(math.exp(v) for v in row)))


def test_mdm_loss_by_hand():
    masked = torch.tensor([[True, False, True], [False, True, True]])
    p = torch.tensor([[0.5], [0.25]])
    expected = ((nll(0, 0) + nll(0, 2)) / 0.5 + (nll(1, 1) + nll(1, 2)) / 0.25) / (2 * 3)
    assert mdm_loss(LOGITS, TARGETS, masked, p).item() == pytest.approx(expected, rel=1e-6)


def test_sft_loss_by_hand():
    # Row 0: prompt = position 0, answer = 1..2 (length 2); row 1: prompt 0..1, answer = 2 (an EOS pad).
    masked = torch.tensor([[False, True, True], [False, False, True]])
    p = torch.tensor([[0.5], [0.8]])
    answer_lengths = torch.tensor([2, 1])
    expected = ((nll(0, 1) + nll(0, 2)) / 0.5 / 2 + nll(1, 2) / 0.8 / 1) / 2
    assert sft_loss(LOGITS, TARGETS, masked, p, answer_lengths).item() == pytest.approx(expected, rel=1e-6)


def test_ar_loss_by_hand():
    # position i predicts token i + 1
    def pred(b, i):
        row = LOGITS[b, i].tolist()
        return -(row[TARGETS[b, i + 1]] - math.log(sum(math.exp(v) for v in row)))

    all_pairs = [pred(b, i) for b in range(2) for i in range(2)]
    assert ar_loss(LOGITS, TARGETS).item() == pytest.approx(sum(all_pairs) / 4, rel=1e-6)
    loss_mask = torch.tensor([[False, False, True], [False, True, False]])  # targets (0,2) and (1,1)
    assert ar_loss(LOGITS, TARGETS, loss_mask).item() == pytest.approx((pred(0, 1) + pred(1, 0)) / 2, rel=1e-6)


def test_ar_loss_of_a_one_token_batch_is_zero_not_nan():
    logits = torch.randn(3, 1, 4, requires_grad=True)
    loss = ar_loss(logits, torch.zeros(3, 1, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_losses_accept_bf16_logits():
    masked = torch.ones(2, 3, dtype=torch.bool)
    p = torch.ones(2, 1)
    full = mdm_loss(LOGITS, TARGETS, masked, p)
    half = mdm_loss(LOGITS.bfloat16(), TARGETS, masked, p)
    assert half.dtype == torch.float32 and abs(half.item() - full.item()) < 0.05


# ----------------------------------------------------------------------------------- likelihood


@pytest.fixture(scope="module")
def model_fn():
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, mlp_hidden_size=64, init_std=0.5)
    model = build_model(cfg, seed=11)
    return lambda ids, attention_mask: model(ids, attention_mask)


PROMPT = torch.tensor([1, 2, 3])
ANSWER = torch.tensor([4, 5, 6, 7, 8])


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_mc_estimate_agrees_with_exact_enumeration(model_fn, cfg_scale):
    exact = exact_log_likelihood_bound(model_fn, PROMPT, ANSWER, mask_id=MASK, cfg_scale=cfg_scale)
    est = mc_log_likelihood(model_fn, PROMPT, ANSWER, mask_id=MASK, mc_num=512, batch_size=64, cfg_scale=cfg_scale,
                            generator=gen(5))
    assert abs(est.log_likelihood - exact) < 3 * est.stderr
    assert est.num_samples == 512 and est.stderr > 0


def test_standard_error_shrinks_with_mc_num(model_fn):
    small = mc_log_likelihood(model_fn, PROMPT, ANSWER, mask_id=MASK, mc_num=64, batch_size=32, generator=gen(6))
    large = mc_log_likelihood(model_fn, PROMPT, ANSWER, mask_id=MASK, mc_num=1024, batch_size=128, generator=gen(6))
    assert 2.5 < small.stderr / large.stderr < 6.5  # ~ sqrt(16) = 4


def test_t_bound_agrees_with_exact(model_fn):
    ids = torch.tensor([3, 1, 4, 1, 5, 9])
    exact = exact_t_bound(model_fn, ids, mask_id=MASK)
    est = t_bound(model_fn, ids, mask_id=MASK, mc_num=1024, batch_size=128, generator=gen(7))
    assert abs(est.log_likelihood - exact) < 3 * est.stderr


def test_t_form_with_tiny_eps_equals_l_form(model_fn):
    ids = torch.tensor([2, 7, 1, 8, 2])
    assert exact_t_bound(model_fn, ids, mask_id=MASK, eps=1e-12) == pytest.approx(
        exact_log_likelihood_bound(model_fn, ids[:0], ids, mask_id=MASK), rel=1e-9)


def test_context_free_model_bound_is_sum_of_log_probs():
    """A model whose prediction ignores context: every weight sums to one per position, so the
    bound is exactly sum_i log q(x_i)."""
    q = torch.log_softmax(torch.tensor([0.3, -1.2, 2.0, 0.1, 0.0, 1.0, -0.5, 0.7] + [0.0] * 8), -1)
    fn = lambda ids, am: q.expand(*ids.shape, VOCAB).clone()  # noqa: E731
    expected = sum(q[t].item() for t in ANSWER.tolist())
    assert exact_log_likelihood_bound(fn, PROMPT, ANSWER, mask_id=MASK) == pytest.approx(expected, rel=1e-6)
    est = mc_log_likelihood(fn, PROMPT, ANSWER, mask_id=MASK, mc_num=64, batch_size=16, generator=gen(8))
    assert est.log_likelihood == pytest.approx(expected, abs=3 * est.stderr + 1e-4)


def test_reproducible_and_validated(model_fn):
    a = mc_log_likelihood(model_fn, PROMPT, ANSWER, mask_id=MASK, mc_num=32, batch_size=16, generator=gen(9))
    b = mc_log_likelihood(model_fn, PROMPT, ANSWER, mask_id=MASK, mc_num=32, batch_size=16, generator=gen(9))
    assert a == b
    with pytest.raises(RemaskError, match="multiple of batch_size"):
        mc_log_likelihood(model_fn, PROMPT, ANSWER, mask_id=MASK, mc_num=30, batch_size=16)
    with pytest.raises(RemaskError, match="limited to"):
        exact_log_likelihood_bound(model_fn, PROMPT, torch.zeros(17, dtype=torch.long), mask_id=MASK)
