"""The mask predictor: a LLaMA-style Transformer with no causal mask (LLaDA, section 2.1).

Reads top to bottom: RMSNorm -> rotary -> attention -> MLP -> block -> model.
`ids (B, T) [+ attention_mask (B, T)] -> logits (B, T, V)`. Forward pass only: no loss,
sampling or tokenizer here. `config.attention` is the one difference between the mask predictor
(full), the AR twin (causal) and a block diffusion model (block: bidirectional inside blocks of
`config.block_length` positions, causal across them).
Parameter names follow the published LLaDA checkpoints so the key map stays short.

For KV caching, `forward` also takes the keys and values of other positions (`past`, a `KV`)
that the tokens attend to besides each other, returns the keys and values of its own tokens
(`return_kv`), and computes logits only where asked (`logits_at`). The caches themselves -- what
to keep and when to refresh it -- belong to the samplers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from remask.config import ModelConfig

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32 and cast back (as LLaDA/OLMo do)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rotary_tables(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin for integer `positions`, in float32: shape (T, head_dim) for positions (T,), or
    (B, 1, T, head_dim) for per-row positions (B, T), broadcasting over the heads.

    Non-interleaved ("rotate half") layout: frequency i acts on dims i and i + head_dim/2.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    freqs = positions.float()[..., None] * inv_freq  # (..., T, head_dim/2)
    angles = torch.cat([freqs, freqs], dim=-1)  # (..., T, head_dim)
    if positions.dim() == 2:
        angles = angles[:, None]  # (B, 1, T, head_dim)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, T, D) query/key vectors; computed in float32 like LLaDA's rope_full_precision."""
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


@dataclass
class KV:
    """Keys and values of some positions in every layer, rotary already applied: what a cached
    forward pass attends to without recomputing. `valid` (B, T) marks the positions that may be
    attended (False: padding); None means all."""

    layers: list[tuple[Tensor, Tensor]]  # per layer: k, v of shape (B, Hkv, T, D)
    valid: Tensor | None = None
    filled: int | None = None  # a buffer (`allocate`): only the first `filled` of its T positions hold entries

    @property
    def length(self) -> int:
        return self.layers[0][0].shape[2] if self.filled is None else self.filled

    def valid_mask(self) -> Tensor:
        k = self.layers[0][0]
        if self.valid is None:
            return torch.ones(k.shape[0], self.length, dtype=torch.bool, device=k.device)
        return self.valid if self.filled is None else self.valid[:, :self.filled]

    def positions(self, index: Tensor | slice) -> KV:
        """The entries of some positions (an index or slice along T)."""
        return KV([(k[:, :, index], v[:, :, index]) for k, v in self.layers],
                  None if self.valid is None else self.valid[:, index])

    def rows(self, index: Tensor) -> KV:
        """The entries of some batch rows."""
        return KV([(k[index], v[index]) for k, v in self.layers], None if self.valid is None else self.valid[index],
                  self.filled)

    @staticmethod
    def allocate(prefix: KV, capacity: int) -> KV:
        """A buffer of `capacity` positions holding `prefix`: a forward pass given it as `past` writes its
        own tokens' keys/values in place after the filled part instead of concatenating (AR decoding
        then copies nothing per token)."""
        layers = []
        for k, v in prefix.layers:
            kb, vb = k.new_zeros(*k.shape[:2], capacity, k.shape[3]), v.new_zeros(*v.shape[:2], capacity, v.shape[3])
            kb[:, :, :k.shape[2]], vb[:, :, :v.shape[2]] = k, v
            layers.append((kb, vb))
        valid = torch.zeros(layers[0][0].shape[0], capacity, dtype=torch.bool, device=layers[0][0].device)
        valid[:, :prefix.length] = prefix.valid_mask()
        return KV(layers, valid, prefix.length)

    @staticmethod
    def stack(rows: list[KV]) -> KV:
        """Single-row caches of different lengths as one batch, right-padded (the padding invalid);
        one cache is itself."""
        if len(rows) == 1:
            return rows[0]
        width = max(r.length for r in rows)
        layers = []
        for i in range(len(rows[0].layers)):
            ks, vs = [], []
            for r in rows:
                k, v = r.layers[i]
                pad = width - k.shape[2]
                ks.append(F.pad(k, (0, 0, 0, pad)))
                vs.append(F.pad(v, (0, 0, 0, pad)))
            layers.append((torch.cat(ks), torch.cat(vs)))
        valid = torch.cat([F.pad(r.valid_mask(), (0, width - r.length), value=False) for r in rows])
        return KV(layers, valid)

    def cat(self, other: KV) -> KV:
        """These positions followed by `other`'s."""
        valid = None if self.valid is None and other.valid is None else torch.cat([self.valid_mask(), other.valid_mask()], 1)
        return KV([(torch.cat([k, k2], 2), torch.cat([v, v2], 2)) for (k, v), (k2, v2) in zip(self.layers, other.layers)],
                  valid)


class Attention(nn.Module):
    """Multi-head attention with optional grouped KV heads; SDPA does the work."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.effective_n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.effective_n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.effective_n_kv_heads * cfg.head_dim, bias=False)
        self.attn_out = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | BlockMask | None, causal: bool,
                past: tuple[Tensor, Tensor] | None = None,
                filled: int | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """(output, (k, v) of these tokens); `past` keys/values are attended to as well (a buffer
        when `filled` is given: these tokens' keys/values are written into it after `filled`)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        new = (k, v)
        if past is not None and filled is not None:  # a buffer: write in place, attend to its filled part
            past[0][:, :, filled:filled + T], past[1][:, :, filled:filled + T] = k, v
            k, v = past[0][:, :, :filled + T], past[1][:, :, :filled + T]
        elif past is not None:  # keys (B, Hkv, Tp + T, D): the cached positions first
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        if self.n_kv_heads != self.n_heads:  # grouped-query attention: head h reads KV head h // group
            group = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        if isinstance(mask, Tensor) or mask is None:
            # With an explicit mask the causal part is already folded into it (see attention_bias).
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        else:  # a FlexAttention BlockMask: the block-sparse kernel skips the tiles it masks whole
            y = flex_kernel(q.is_cuda)(q, k, v, block_mask=mask)
        return self.attn_out(y.transpose(1, 2).reshape(B, T, -1)), new


_COMPILED_FLEX = []


def flex_kernel(cuda: bool) -> Callable:
    """FlexAttention: compiled once on CUDA (its fused kernel); elsewhere the eager reference, which
    forms the whole score matrix and has no backward on CPU (a check of the mask, not a speed-up)."""
    from torch.nn.attention.flex_attention import flex_attention

    if not cuda:
        return flex_attention
    if not _COMPILED_FLEX:
        _COMPILED_FLEX.append(torch.compile(flex_attention, dynamic=False))
    return _COMPILED_FLEX[0]


class SwiGLU(nn.Module):
    """ff_out(silu(ff_proj(x)) * up_proj(x)) -- LLaDA's names for gate, up and down."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ff_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden_size, bias=False)  # gate
        self.up_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(cfg.mlp_hidden_size, cfg.d_model, bias=False)  # down

    def forward(self, x: Tensor) -> Tensor:
        return self.ff_out(F.silu(self.ff_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.ff_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | BlockMask | None, causal: bool,
                past: tuple[Tensor, Tensor] | None = None,
                filled: int | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        h, kv = self.attn(self.attn_norm(x), cos, sin, mask, causal, past, filled)
        x = x + h
        return x + self.mlp(self.ff_norm(x)), kv


def block_ids(positions: Tensor, block_length: int) -> Tensor:
    """The block of each position (block diffusion): positions 0..block_length-1 form block 0."""
    return torch.div(positions, block_length, rounding_mode="floor")


def attention_bias(attention_mask: Tensor | None, cfg: ModelConfig, T: int, device: torch.device,
                   past_valid: Tensor | None = None, positions: Tensor | None = None) -> Tensor | None:
    """Boolean SDPA mask (B or 1, 1, T, Tp + T) where True = may attend, or None for the fast path
    (also when a full-attention model may attend to every key).

    `attention_mask` (B, T) marks real tokens with 1 and (left) padding with 0; `past_valid`
    (B, Tp) the attendable cached positions, which come first among the keys: for the causal and
    block layouts they precede the T tokens (a block cache holds finished blocks only), so every
    valid one may be attended. The block layout reads each token's block from its rotary
    `positions` (T,) or (B, T). Every query may always attend to itself so that padded rows never
    see an all-masked row (NaN).
    """
    layout = cfg.attention
    if attention_mask is None and past_valid is None and layout != "block":
        return None
    rows = attention_mask if attention_mask is not None else past_valid
    B = 1 if rows is None else rows.shape[0]
    current = (torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None
               else attention_mask.bool())
    keys = current if past_valid is None else torch.cat([past_valid.bool(), current], dim=1)  # (B, Tp + T)
    if layout == "full" and bool(keys.all()):  # nothing to hide: the unmasked (faster) kernel
        return None
    Tp = keys.shape[1] - T
    allowed = keys[:, None, None, :].expand(-1, 1, T, Tp + T)
    itself = torch.eye(T, Tp + T, dtype=torch.bool, device=device).roll(Tp, dims=1)  # query i -> key Tp + i
    if layout == "causal":
        allowed = allowed & torch.ones(T, Tp + T, dtype=torch.bool, device=device).tril(Tp)
    elif layout == "block":
        pos = torch.arange(T, device=device) if positions is None else positions
        blk = block_ids(pos, cfg.block_length)  # (T,) or (B, T)
        order = blk[..., None, :] <= blk[..., :, None]  # (.., T, T): key block <= query block
        order = F.pad(order, (Tp, 0), value=True)  # the cached keys precede every query's block
        allowed = allowed & (order[None, None] if order.dim() == 2 else order[:, None])
    return allowed | itself


class Transformer(nn.Module):
    """LLaDA mask predictor (or, by `cfg.attention`, its autoregressive twin or a block diffusion model)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.padded_vocab, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.ff_out = None if cfg.weight_tying else nn.Linear(cfg.d_model, cfg.padded_vocab, bias=False)

    def forward(self, ids: Tensor, attention_mask: Tensor | None = None, positions: Tensor | None = None, *,
                past: KV | None = None, return_kv: bool = False, logits_at: Tensor | slice | None = None,
                mask: Tensor | BlockMask | None = None) -> Tensor | tuple[Tensor, KV]:
        """ids (B, T) -> logits (B, T, V).

        `positions` (T,), or (B, T) per row, are the rotary positions of `ids` (default
        0..T-1). Left padding needs no position shift: rotary attention depends only on relative
        positions. For caching: `past` holds keys/values of other positions the tokens attend to
        as well (for the AR twin, earlier ones; a buffer from `KV.allocate` is extended in place);
        `return_kv` also returns these tokens' own (a `KV`, valid where `attention_mask` is); `logits_at` (an index or slice along T, or a
        (B, N) index per row) computes the output head only there. `mask` (B or 1, 1, T, T), True =
        may attend, replaces the layout's own (block diffusion's training pass over the noisy and
        the clean sequence together); no `attention_mask` or `past` with it. It may also be a
        FlexAttention `BlockMask` of the same pattern, run by FlexAttention's block-sparse kernel.
        """
        B, T = ids.shape
        total = T + (past.length if past is not None else 0)
        if total > self.config.max_sequence_length and positions is not None:
            # Keys may be padding, and positions repeat (block diffusion's two streams): the span is the positions'.
            total = int(positions.max()) + 1
        if total > self.config.max_sequence_length:
            raise ValueError(f"sequence length {total} exceeds max_sequence_length {self.config.max_sequence_length}")
        if positions is None:
            positions = torch.arange(T, device=ids.device)
        cos, sin = rotary_tables(positions, self.config.head_dim, self.config.rope_theta)
        if mask is None:
            mask = attention_bias(attention_mask, self.config, T, ids.device,
                                  None if past is None else past.valid_mask(), positions)
        elif attention_mask is not None or past is not None:
            raise ValueError("an explicit attention mask takes no attention_mask or past")
        x = self.wte(ids)  # (B, T, d)
        layers = []
        causal = self.config.attention == "causal"
        filled = None if past is None else past.filled
        for i, block in enumerate(self.blocks):
            x, kv = block(x, cos, sin, mask, causal, None if past is None else past.layers[i], filled)
            layers.append(kv)
        if filled is not None:  # the buffer now holds these tokens too
            if past.valid is not None:
                past.valid[:, filled:filled + T] = True if attention_mask is None else attention_mask.bool()
            past.filled = filled + T
        if isinstance(logits_at, Tensor) and logits_at.dim() == 2:
            x = x.gather(1, logits_at[..., None].expand(-1, -1, x.shape[-1]))  # (B, N, d)
        elif logits_at is not None:
            x = x[:, logits_at]
        x = self.ln_f(x)
        head = self.wte.weight if self.ff_out is None else self.ff_out.weight
        logits = F.linear(x, head)  # (B, T, V)
        if not return_kv:
            return logits
        return logits, KV(layers, None if attention_mask is None else attention_mask.bool())

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, init_std) for all matrices, output projections scaled by 1/sqrt(2 * n_layers)
        (GPT-2's residual scaling); norms at one."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                scale = 1 / math.sqrt(2 * self.config.n_layers) if name.endswith(("attn_out.weight", "mlp.ff_out.weight")) else 1.0
                p.normal_(0.0, std * scale, generator=generator)


def build_model(cfg: ModelConfig, *, seed: int = 0, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> Transformer:
    """A freshly initialised model, reproducible for a given seed."""
    model = Transformer(cfg)
    model.reset_parameters(torch.Generator().manual_seed(seed))
    return model.to(device=device, dtype=dtype)
