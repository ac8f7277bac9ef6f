"""CUDA against the CPU (marked `gpu`; skipped where CUDA is absent): the bfloat16 forward pass
against float32 within a tolerance, the fast engine on CUDA token for token with the CPU at
temperature 0, and a saved model's answers through the pipeline the same on both devices."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from remask.model import build_model
from remask.pipeline import Pipeline
from remask.sampling import SamplerConfig
from remask.sampling.engine import Engine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

V = 32
MASK = V - 1
EOS = V - 3


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, EOS, (n,), generator=g).tolist() for n in (3, 6, 9, 4)]


LAYOUTS = {"full": {}, "causal": {"attention": "causal"}, "block": {"attention": "block", "block_length": 8}}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bf16_forward_is_fp32_within_tolerance(layout):
    """The same weights in bfloat16: logits within a few hundredths of their spread of the float32
    ones (a few tenths at worst), the same argmax where float32's lead is clear; float32 on CUDA
    is the CPU's to rounding."""
    cfg = tiny_config(V, max_sequence_length=64, init_std=0.3, **LAYOUTS[layout])
    cpu = build_model(cfg, seed=3).eval()  # one set of weights, copied to each device and precision
    fp32 = build_model(cfg, seed=3).to("cuda").eval()
    bf16 = build_model(cfg, seed=3).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, V, (4, 48), generator=torch.Generator().manual_seed(1)).to("cuda")
    with torch.no_grad():
        ref, low = fp32(ids), bf16(ids).float()  # (B, T, V)
    scale, error = ref.std().item(), (low - ref).abs()
    # bfloat16 keeps 8 bits of mantissa (0.4% per rounding), compounded over the layers: on the
    # CPU this model's error is 1.3% of the logits' spread on average and 16% at worst
    assert error.mean().item() < 0.03 * scale and error.max().item() < 0.3 * scale
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.6 * scale  # a lead no error above bounds can overturn
    assert clear.any() and torch.equal(low.argmax(-1)[clear], ref.argmax(-1)[clear])
    with torch.no_grad():
        torch.testing.assert_close(cpu(ids.cpu()), ref.cpu(), atol=1e-4 * scale, rtol=1e-4)


@pytest.mark.parametrize("sampler", [
    SamplerConfig(gen_length=16, steps=16, block_length=8),
    SamplerConfig(gen_length=16, steps=16, block_length=8, cache="prefix"),
    SamplerConfig(gen_length=16, steps=16, block_length=8, cache="dual", parallel="threshold", threshold=0.3),
    SamplerConfig(gen_length=16, steps=8, block_length=16, cache="dual", parallel="factor", factor=1.0),
    SamplerConfig(gen_length=20, steps=20),
    SamplerConfig(gen_length=20, steps=10, parallel="threshold", threshold=0.3),
], ids=["lossless", "prefix", "dual-threshold", "dual-factor", "block", "block-threshold"])
def test_fast_engine_on_cuda_equals_cpu(sampler, request):
    """Four rows of different lengths in one engine, at temperature 0: the same sequences and the
    same reveal steps on CUDA as on the CPU (float64, so that no argmax flips by rounding); the
    block cases with a block model (L' = 4) and its exact cache."""
    block = request.node.callspec.id.startswith("block")
    cfg = tiny_config(V, max_sequence_length=64, init_std=0.3, **({"attention": "block", "block_length": 4} if block else {}))

    def run(device: str):
        model = build_model(cfg, seed=3, dtype=torch.float64).to(device).eval()  # the same weights on each device
        engine = Engine(model, mask_id=MASK, vocab_size=V, eos_ids=[EOS])
        rows = [engine.add(torch.tensor(p, device=device), sampler) for p in prompts()]
        engine.run()
        return [(r.result().seq, r.result().reveal_step) for r in rows]

    cpu, cuda = run("cpu"), run("cuda")
    assert cuda == cpu
    assert all(seq[:len(p)] == p and len(seq) > len(p) for (seq, _), p in zip(cpu, prompts()))


@pytest.mark.parametrize("which", ["model_dir", "ar_model_dir"])
def test_pipeline_answers_on_cuda_equal_cpu(which, request):
    """A saved tiny model (float32) asked through the pipeline on each device: the same answer at temperature 0."""
    directory = request.getfixturevalue(which)
    sampler = SamplerConfig(gen_length=16, steps=16, block_length=8)
    answers = [Pipeline.load(directory, device=d).generate("床前明月光", sampler, seed=0) for d in ("cpu", "cuda")]
    assert answers[0].ids == answers[1].ids and answers[0].text == answers[1].text
