"""FlexAttention for block diffusion's two-stream pass: its BlockMask is the boolean mask's pattern
position for position, and the pass under it gives the boolean mask's logits (the CPU runs
FlexAttention's eager reference, forward only); on CUDA (marked `gpu`) its compiled kernel gives
the boolean mask's training loss and gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from remask.diffusion.block import answer_offsets, row_positions, two_stream_block_mask, two_stream_logits, two_stream_mask
from remask.model import build_model
from remask.train.objectives import OBJECTIVES, Noise, TextBatch

V = 32
MASK = V - 1


def grids(L: int, block_length: int) -> dict[str, torch.Tensor]:
    """Rotary positions of the pass: one grid for all rows (pretraining), and rows shifted so that
    each answer starts on a block boundary (SFT), several shifts in one batch."""
    prompts = torch.tensor([3, 5, 8])
    return {"shared": row_positions(L, torch.zeros(1, dtype=torch.long)),
            "per row": row_positions(L, answer_offsets(prompts, block_length))}


@pytest.mark.parametrize("grid", ["shared", "per row"])
@pytest.mark.parametrize("block_length", [4, 5])
def test_the_block_mask_is_the_boolean_mask(grid, block_length):
    positions = grids(24, block_length)[grid]
    dense = two_stream_mask(positions, block_length)  # (B, 1, 2L, 2L)
    rule = two_stream_block_mask(positions, block_length).mask_mod
    q, k = torch.arange(48)[:, None], torch.arange(48)[None, :]
    for b in range(positions.shape[0]):
        assert torch.equal(rule(torch.tensor(b), torch.tensor(0), q, k), dense[b, 0])


@pytest.mark.parametrize("grid", ["shared", "per row"])
@torch.no_grad()
def test_the_two_stream_pass_under_flex_attention_equals_the_boolean_mask(grid):
    cfg = tiny_config(V, max_sequence_length=64, init_std=0.3, attention="block", block_length=4, n_kv_heads=1)
    model = build_model(cfg, seed=4).eval()
    positions = grids(24, 4)[grid].expand(3, -1)
    g = torch.Generator().manual_seed(6)
    clean = torch.randint(0, V - 2, (3, 24), generator=g)
    noisy = clean.masked_fill(torch.rand(3, 24, generator=g) < 0.5, MASK)
    sdpa = two_stream_logits(model, noisy, clean, positions, 4)
    flex = two_stream_logits(model, noisy, clean, positions, 4, kernel="flex")
    assert torch.allclose(flex, sdpa, atol=1e-5, rtol=1e-5) and sdpa.std() > 0.1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_block_training_under_compiled_flex_attention_equals_the_boolean_mask_on_cuda():
    cfg = tiny_config(V, max_sequence_length=256, init_std=0.3, attention="block", block_length=8)
    batch = TextBatch(torch.randint(0, V - 2, (4, 128), generator=torch.Generator().manual_seed(7)).cuda())
    objective = OBJECTIVES[("pretrain", "bd")]
    results = []
    for kernel in ("sdpa", "flex"):
        model = build_model(cfg, seed=5).cuda()
        inputs = objective.make_inputs(batch, Noise(MASK, block_length=8, kernel=kernel), torch.Generator("cuda").manual_seed(8))
        loss = objective.loss(model, inputs)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, rtol=1e-4)
    assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in zip(grads_a, grads_b))
