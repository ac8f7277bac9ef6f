"""The mask predictor against a hand-written reference, and its structural properties."""

import math

import pytest
import torch

from remask.config import ConfigError, ModelConfig, preset
from remask.model import build_model

VOCAB = 48


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, mlp_hidden_size=48, max_sequence_length=64)
    return ModelConfig(**(base | kw))


LAYOUTS = {"full": {}, "causal": {"attention": "causal"}, "block": {"attention": "block", "block_length": 3}}


def reference_forward(model, ids: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Plain transcription in float64: explicit softmax attention, complex-number rotary, the
    layout written out per (query, key) pair (block: key i // L' <= query j // L')."""
    cfg = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    B, T = ids.shape
    H, Hkv, D = cfg.n_heads, cfg.effective_n_kv_heads, cfg.head_dim

    def norm(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    def rope(x):  # (B, H, T, D): pair dim i with i + D/2 as one complex number, rotate by pos * freq_i
        half = D // 2
        freq = torch.tensor([cfg.rope_theta ** (-2 * i / D) for i in range(half)], dtype=torch.float64)
        angle = torch.arange(T, dtype=torch.float64)[:, None] * freq[None, :]
        z = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angle), angle)
        return torch.cat([z.real, z.imag], dim=-1)

    x = sd["wte.weight"][ids]
    for i in range(cfg.n_layers):
        p = f"blocks.{i}."
        h = norm(x, sd[p + "attn_norm.weight"])
        q = (h @ sd[p + "attn.q_proj.weight"].T).view(B, T, H, D).transpose(1, 2)
        k = (h @ sd[p + "attn.k_proj.weight"].T).view(B, T, Hkv, D).transpose(1, 2)
        v = (h @ sd[p + "attn.v_proj.weight"].T).view(B, T, Hkv, D).transpose(1, 2)
        q, k = rope(q), rope(k)
        out = torch.zeros(B, H, T, D, dtype=torch.float64)
        for head in range(H):
            kv = head // (H // Hkv)
            scores = q[:, head] @ k[:, kv].transpose(-1, -2) / math.sqrt(D)  # (B, T, T)
            allowed = torch.ones(B, T, T, dtype=torch.bool)
            for qi in range(T):
                for ki in range(T):
                    if cfg.attention == "causal" and ki > qi:
                        allowed[:, qi, ki] = False
                    if cfg.attention == "block" and ki // cfg.block_length > qi // cfg.block_length:
                        allowed[:, qi, ki] = False
            if key_mask is not None:
                allowed &= key_mask.bool()[:, None, :]
            allowed |= torch.eye(T, dtype=torch.bool)
            scores = scores.masked_fill(~allowed, float("-inf"))
            out[:, head] = torch.softmax(scores, -1) @ v[:, kv]
        x = x + out.transpose(1, 2).reshape(B, T, H * D) @ sd[p + "attn.attn_out.weight"].T
        h = norm(x, sd[p + "ff_norm.weight"])
        gate = h @ sd[p + "mlp.ff_proj.weight"].T
        x = x + (gate * torch.sigmoid(gate) * (h @ sd[p + "mlp.up_proj.weight"].T)) @ sd[p + "mlp.ff_out.weight"].T
    x = norm(x, sd["ln_f.weight"])
    head = sd["wte.weight"] if cfg.weight_tying else sd["ff_out.weight"]
    return x @ head.T


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 2}, {"weight_tying": True}, {"rope_theta": 500_000.0}])
def test_matches_reference(layout, kw):
    model = build_model(tiny(**LAYOUTS[layout], **kw), seed=1)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    got = model(ids).double()
    torch.testing.assert_close(got, reference_forward(model, ids), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("layout", ["full", "causal"])
def test_matches_reference_with_padding_mask(layout):
    model = build_model(tiny(**LAYOUTS[layout]), seed=2)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0
    got = model(ids, mask).double()
    torch.testing.assert_close(got, reference_forward(model, ids, mask), atol=2e-5, rtol=1e-4)


def test_bidirectional_vs_causal():
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % VOCAB
    mdm, ar = build_model(tiny(), seed=4), build_model(tiny(attention="causal"), seed=4)
    # A later token changes every earlier position's logits in the mask predictor ...
    diff = (mdm(changed) - mdm(ids))[0, :-1].abs().amax(-1)
    assert (diff > 1e-4).all()
    # ... and none of them in the AR twin, which shares every weight.
    assert torch.equal(ar(changed)[0, :-1], ar(ids)[0, :-1])
    assert ar.state_dict().keys() == mdm.state_dict().keys()
    for k, v in mdm.state_dict().items():
        assert torch.equal(v, ar.state_dict()[k])


@pytest.mark.parametrize("layout", ["full", "causal"])
def test_left_padding_and_batch_invariance(layout):
    model = build_model(tiny(**LAYOUTS[layout]), seed=5)
    g = torch.Generator().manual_seed(6)
    a, b = torch.randint(0, VOCAB, (1, 10), generator=g), torch.randint(0, VOCAB, (1, 6), generator=g)
    pad_id = 0  # any id: padded keys are masked out
    batch = torch.cat([a, torch.cat([torch.full((1, 4), pad_id), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    out = model(batch, mask)
    torch.testing.assert_close(out[0], model(a)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, 4:], model(b)[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


def test_positions_argument_is_a_shift_invariant_offset():
    # Rotary attention depends only on relative positions: offsetting all positions changes nothing.
    model = build_model(tiny(), seed=7)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(model(ids, positions=torch.arange(8) + 13), model(ids), atol=1e-5, rtol=1e-5)


def test_bf16_close_to_fp32():
    model = build_model(tiny(), seed=9)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(10))
    ref = model(ids)
    low = build_model(tiny(), seed=9, dtype=torch.bfloat16)(ids)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_parameter_count_and_presets():
    for name in ("tiny", "small"):
        cfg = preset(name)
        assert sum(p.numel() for p in build_model(cfg).parameters()) == cfg.num_parameters()
    big = preset("llada-8b")
    assert (big.n_layers, big.d_model, big.n_heads, big.mlp_hidden_size, big.vocab_size) == (32, 4096, 32, 12288, 126464)
    assert big.rope_theta == 500_000.0 and big.max_sequence_length == 4096 and not big.weight_tying
    # LLaDA 8B has about 8.0B parameters.
    assert 7.9e9 < big.num_parameters() < 8.1e9


@pytest.mark.parametrize(
    "kw, fragment",
    [
        ({"d_model": 30}, "divisible by n_heads"),
        ({"n_kv_heads": 3}, r"n_kv_heads \(3\) must divide n_heads"),
        ({"attention": "causal-ish"}, "attention must be one of"),
        ({"attention": "block"}, "block_length is required with attention block"),
        ({"block_length": 4}, r"block_length \(4\) goes with attention block only"),
        ({"attention": "block", "block_length": 0}, "block_length must be > 0"),
        ({"rope_theta": float("inf")}, "rope_theta must be a finite number"),
        ({"mask_token_id": 1.5}, "mask_token_id must be an integer"),
        ({"n_layers": True}, "n_layers must be an integer"),
        ({"n_layers": 0}, "n_layers"),
        ({"mask_token_id": VOCAB}, "outside the vocabulary"),
    ],
)
def test_config_validation(kw, fragment):
    with pytest.raises(ConfigError, match=fragment):
        tiny(**kw)


def test_config_round_trip_and_unknown_key():
    cfg = tiny(n_kv_heads=2, attention="causal")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown model config key.*bogus"):
        ModelConfig.from_dict(cfg.to_dict() | {"bogus": 1}, where="model config")


def test_too_long_sequence_rejected():
    model = build_model(tiny(max_sequence_length=8))
    with pytest.raises(ValueError, match="exceeds max_sequence_length"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_attention_bias_is_none_only_when_a_bidirectional_model_may_see_every_key():
    """Hand cases: the unmasked kernel only where the mask would allow everything."""
    from remask.model import attention_bias

    full, causal_cfg = tiny(), tiny(attention="causal")
    ones, padded = torch.ones(2, 3, dtype=torch.long), torch.tensor([[1, 1, 1], [0, 1, 1]])
    assert attention_bias(None, full, 3, torch.device("cpu")) is None
    assert attention_bias(ones, full, 3, torch.device("cpu")) is None
    assert attention_bias(ones, full, 3, torch.device("cpu"), past_valid=torch.ones(2, 2)) is None
    mask = attention_bias(padded, full, 3, torch.device("cpu"))
    assert mask.shape == (2, 1, 3, 3) and mask[0].all()
    assert mask[1, 0].tolist() == [[True, True, True], [False, True, True], [False, True, True]]  # the pad sees itself too
    past = attention_bias(ones, full, 3, torch.device("cpu"), past_valid=torch.tensor([[1, 0], [1, 1]]))
    assert past[0, 0, :, 1].tolist() == [False] * 3 and past[1].all()
    causal = attention_bias(ones, causal_cfg, 3, torch.device("cpu"))
    assert causal is not None and causal[0, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]


def test_a_kv_buffer_is_extended_in_place_and_gives_the_uncached_logits():
    """`KV.allocate`: token-by-token decoding into a preallocated buffer equals one pass over the
    whole (left-padded) batch, and the buffer holds every position afterwards."""
    from remask.model import KV

    model = build_model(tiny(attention="causal"), seed=7)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    whole = model(ids, mask)
    _, kv = model(ids[:, :6], mask[:, :6], return_kv=True)
    buffer = KV.allocate(kv, 10)
    for t in range(6, 10):
        step = model(ids[:, t:t + 1], None, torch.tensor([t]), past=buffer)
        torch.testing.assert_close(step[:, 0], whole[:, t], atol=1e-5, rtol=1e-5)
    assert buffer.filled == buffer.length == 10 and buffer.valid_mask().tolist() == mask.bool().tolist()
