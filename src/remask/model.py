"""The mask predictor: a LLaMA-style Transformer with no causal mask (LLaDA, section 2.1).

Reads top to bottom: RMSNorm -> rotary -> attention -> MLP -> block -> model.
`ids (B, T) [+ attention_mask (B, T)] -> logits (B, T, V)`. Forward pass only: no loss,
sampling or tokenizer here. `config.causal` is the one difference from the AR twin.
Parameter names follow the published LLaDA checkpoints so the key map stays short.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from remask.config import ModelConfig


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
    """cos, sin of shape (T, head_dim) for integer `positions` (T,), in float32.

    Non-interleaved ("rotate half") layout: frequency i acts on dims i and i + head_dim/2.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    freqs = torch.outer(positions.float(), inv_freq)  # (T, head_dim/2)
    angles = torch.cat([freqs, freqs], dim=-1)  # (T, head_dim)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, T, D) query/key vectors; computed in float32 like LLaDA's rope_full_precision."""
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    """Multi-head attention with optional grouped KV heads; SDPA does the work."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.effective_n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.effective_n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.effective_n_kv_heads * cfg.head_dim, bias=False)
        self.attn_out = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.n_kv_heads != self.n_heads:  # grouped-query attention: head h reads KV head h // group
            group = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        # With an explicit mask the causal part is already folded into it (see attention_bias).
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        return self.attn_out(y.transpose(1, 2).reshape(B, T, -1))


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

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, causal)
        return x + self.mlp(self.ff_norm(x))


def attention_bias(attention_mask: Tensor | None, causal: bool, T: int, device: torch.device) -> Tensor | None:
    """Boolean SDPA mask (B, 1, T, T) where True = may attend, or None for the fast path.

    `attention_mask` (B, T) marks real tokens with 1 and (left) padding with 0. Every query
    may always attend to itself so that padded rows never see an all-masked row (NaN).
    """
    if attention_mask is None:
        return None
    keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
    allowed = keys.expand(-1, 1, T, T)
    if causal:
        allowed = allowed & torch.ones(T, T, dtype=torch.bool, device=device).tril()
    return allowed | torch.eye(T, dtype=torch.bool, device=device)


class Transformer(nn.Module):
    """LLaDA mask predictor (or, with `cfg.causal`, its autoregressive twin)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.padded_vocab, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.ff_out = None if cfg.weight_tying else nn.Linear(cfg.d_model, cfg.padded_vocab, bias=False)

    def forward(self, ids: Tensor, attention_mask: Tensor | None = None, positions: Tensor | None = None) -> Tensor:
        """ids (B, T) -> logits (B, T, V).

        `positions` (T,) are the rotary positions of `ids` (default 0..T-1); a KV cache passes
        the offsets of the slice it recomputes. Left padding needs no position shift: rotary
        attention depends only on relative positions.
        """
        B, T = ids.shape
        if T > self.config.max_sequence_length:
            raise ValueError(f"sequence length {T} exceeds max_sequence_length {self.config.max_sequence_length}")
        if positions is None:
            positions = torch.arange(T, device=ids.device)
        cos, sin = rotary_tables(positions, self.config.head_dim, self.config.rope_theta)
        mask = attention_bias(attention_mask, self.config.causal, T, ids.device)
        x = self.wte(ids)  # (B, T, d)
        for block in self.blocks:
            x = block(x, cos, sin, mask, self.config.causal)
        x = self.ln_f(x)
        head = self.wte.weight if self.ff_out is None else self.ff_out.weight
        return F.linear(x, head)  # (B, T, V)

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
