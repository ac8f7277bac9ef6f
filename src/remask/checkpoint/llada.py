"""The LLaDA Hugging Face format: tensor names (one explicit key map) and config.json.

A directory written by remask opens with the official LLaDA code
(`LLaDAModelLM.from_pretrained`), and a downloaded LLaDA-8B directory opens in remask. This
module only translates names and dictionaries; reading and writing files is `storage.py`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from remask.config import ModelConfig
from remask.errors import RemaskError

# remask parameter name pattern -> LLaDA (published checkpoint) name pattern; `{i}` is the block index.
# LLaDA's block has no `attn`/`mlp` submodules; ff_proj is the SiLU gate, up_proj the up projection
# and ff_out the down projection, exactly remask's SwiGLU. Rotary is "rotate half" in both: no permutation.
KEY_MAP: dict[str, str] = {
    "wte.weight": "model.transformer.wte.weight",
    "blocks.{i}.attn_norm.weight": "model.transformer.blocks.{i}.attn_norm.weight",
    "blocks.{i}.attn.q_proj.weight": "model.transformer.blocks.{i}.q_proj.weight",
    "blocks.{i}.attn.k_proj.weight": "model.transformer.blocks.{i}.k_proj.weight",
    "blocks.{i}.attn.v_proj.weight": "model.transformer.blocks.{i}.v_proj.weight",
    "blocks.{i}.attn.attn_out.weight": "model.transformer.blocks.{i}.attn_out.weight",
    "blocks.{i}.ff_norm.weight": "model.transformer.blocks.{i}.ff_norm.weight",
    "blocks.{i}.mlp.ff_proj.weight": "model.transformer.blocks.{i}.ff_proj.weight",
    "blocks.{i}.mlp.up_proj.weight": "model.transformer.blocks.{i}.up_proj.weight",
    "blocks.{i}.mlp.ff_out.weight": "model.transformer.blocks.{i}.ff_out.weight",
    "ln_f.weight": "model.transformer.ln_f.weight",
    "ff_out.weight": "model.transformer.ff_out.weight",  # absent with weight_tying
}


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)"))


_TO_LLADA = [(_pattern(ours), theirs) for ours, theirs in KEY_MAP.items()]
_FROM_LLADA = [(_pattern(theirs), ours) for ours, theirs in KEY_MAP.items()]


def _translate(name: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, template in table:
        m = pattern.fullmatch(name)
        if m:
            return template.replace("{i}", m.group("i")) if "i" in m.groupdict() else template
    return None


def to_llada_name(name: str) -> str:
    """remask parameter name -> LLaDA tensor name (RemaskError if KEY_MAP has no entry)."""
    out = _translate(name, _TO_LLADA)
    if out is None:
        raise RemaskError(f"parameter {name!r} has no LLaDA name in KEY_MAP")
    return out


def from_llada_name(name: str) -> str | None:
    """LLaDA tensor name -> remask parameter name, or None for a name KEY_MAP does not know."""
    return _translate(name, _FROM_LLADA)


# --- config.json ---------------------------------------------------------------------------------

# Architecture switches of LLaDA's config: key -> (LLaDA's default when absent, the one value remask
# represents). Anything else changes the network (biases, ALiBi, LayerNorm, QK-norm, ...).
_ARCHITECTURE: dict[str, tuple[Any, Any]] = {
    "rope": (False, True),
    "alibi": (False, False),
    "include_bias": (False, False),
    "include_qkv_bias": (False, False),
    "layer_norm_type": ("default", "rms"),
    "layer_norm_with_affine": (True, True),
    "activation_type": ("swiglu", "silu"),
    "block_type": ("sequential", "llama"),
    "attention_layer_norm": (False, False),
    "scale_logits": (False, False),
    "input_emb_norm": (False, False),
    "block_group_size": (1, 1),  # >1 renames the tensors (block_groups.*)
}

# Keys LLaDA's config carries that do not change the network remask builds; written with these
# values, ignored on load.
_PASSIVE: dict[str, Any] = {
    "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0,
    "attention_layer_norm_with_affine": True,
    "auto_map": {
        "AutoConfig": "configuration_llada.LLaDAConfig",
        "AutoModel": "modeling_llada.LLaDAModelLM",
        "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
    },
    "embedding_dropout": 0.0,
    "flash_attention": False,
    "init_cutoff_factor": None,
    "init_device": "meta",
    "init_fn": "mitchell",
    "mlp_ratio": 4,  # only read by LLaDA when mlp_hidden_size is null; remask always writes that
    "model_type": "llada",
    "precision": "amp_bf16",
    "residual_dropout": 0.0,
    "rope_full_precision": True,  # remask always applies rotary in float32
    "transformers_version": "4.46.3",
    "use_cache": False,
}

_REQUIRED = ("d_model", "n_heads", "n_layers", "vocab_size")
_KNOWN = (set(_ARCHITECTURE) | set(_PASSIVE) | set(_REQUIRED)
          | {"bias_for_layer_norm", "multi_query_attention", "n_kv_heads", "mlp_hidden_size", "max_sequence_length",
             "rope_theta", "rms_norm_eps", "weight_tying", "embedding_size", "init_std", "causal", "attention", "block_length",
             "mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id", "torch_dtype", "_name_or_path"})


def to_llada_config(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json dict LLaDA's code reads for `cfg` (+ remask's `attention`, `block_length` and
    `bos_token_id`)."""
    d: dict[str, Any] = {k: v for k, v in cfg.extra.items() if k not in _KNOWN}  # unknown keys, verbatim
    d |= {key: wanted for key, (_, wanted) in _ARCHITECTURE.items()}
    d |= json.loads(json.dumps(_PASSIVE))  # a deep copy, so callers may mutate the result
    d |= {
        "d_model": cfg.d_model,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads,  # null -> n_heads in LLaDA (effective_n_kv_heads)
        "multi_query_attention": None,
        "n_layers": cfg.n_layers,
        "mlp_hidden_size": cfg.mlp_hidden_size,
        "max_sequence_length": cfg.max_sequence_length,
        "vocab_size": cfg.vocab_size,
        "embedding_size": cfg.embedding_size,  # null -> vocab_size in LLaDA
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "bias_for_layer_norm": False,
        "weight_tying": cfg.weight_tying,
        "init_std": cfg.init_std,
        "mask_token_id": cfg.mask_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "attention": cfg.attention,
    }
    if cfg.block_length is not None:
        d["block_length"] = cfg.block_length
    if cfg.bos_token_id is not None:
        d["bos_token_id"] = cfg.bos_token_id
    return d


def _check_architecture(d: dict[str, Any]) -> None:
    for key, (default, wanted) in _ARCHITECTURE.items():
        value = d.get(key, default)
        if value != wanted or type(value) is not type(wanted):
            raise RemaskError(f"unsupported LLaDA config: {key}={value!r} (remask only builds {key}={wanted!r})")
    # LLaDA: bias_for_layer_norm None inherits include_bias (already checked false above).
    if d.get("bias_for_layer_norm") not in (None, False):
        raise RemaskError(f"unsupported LLaDA config: bias_for_layer_norm={d['bias_for_layer_norm']!r}")


def _kv_heads(d: dict[str, Any]) -> int | None:
    """n_kv_heads as LLaDA's `effective_n_kv_heads` resolves it with multi_query_attention."""
    kv, mqa = d.get("n_kv_heads"), d.get("multi_query_attention")
    if mqa is None:
        return kv
    if not isinstance(mqa, bool):
        raise RemaskError(f"LLaDA config: multi_query_attention must be true, false or null, got {mqa!r}")
    implied = 1 if mqa else d["n_heads"]
    if kv is not None and kv != implied:
        raise RemaskError(f"LLaDA config: n_kv_heads={kv} contradicts multi_query_attention={mqa}")
    return implied if mqa else kv


def _attention(d: dict[str, Any]) -> Any:
    """The attention layout: `attention`, else the older `causal` flag (full unless true)."""
    causal = d.get("causal")
    if causal is not None and not isinstance(causal, bool):
        raise RemaskError(f"model config: causal must be true or false, got {causal!r}")
    layout = d.get("attention", "causal" if causal else "full")
    if causal is not None and (layout == "causal") != causal:
        raise RemaskError(f"model config: attention={layout!r} contradicts causal={causal}")
    return layout


def from_llada_config(d: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a LLaDA config.json dict; RemaskError names a key remask cannot represent.

    Absent architecture keys take LLaDA's defaults; absent token ids and embedding_size are None;
    `attention` defaults to full (LLaDA's checkpoints); the older key `causal` (true: the AR twin)
    is read where `attention` is absent. Keys LLaDA does not define are kept in `extra`. Types are strict
    (ModelConfig checks them): a bool is a JSON boolean, an id an integer, a float finite.
    """
    if not isinstance(d, dict):
        raise RemaskError(f"LLaDA config must be a JSON object, got {type(d).__name__}")
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise RemaskError(f"LLaDA config lacks required key(s): {', '.join(missing)}")
    _check_architecture(d)
    hidden = d.get("mlp_hidden_size")
    if hidden is None:  # LLaDA's fallback: mlp_ratio * d_model
        ratio, width = d.get("mlp_ratio", 4), d["d_model"]
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (ratio, width))
        hidden = ratio * width if ok else ratio
    return ModelConfig(
        vocab_size=d["vocab_size"],
        d_model=d["d_model"],
        n_layers=d["n_layers"],
        n_heads=d["n_heads"],
        n_kv_heads=_kv_heads(d),
        mlp_hidden_size=hidden,
        max_sequence_length=d.get("max_sequence_length", 1024),
        rope_theta=d.get("rope_theta", 10_000.0),
        rms_norm_eps=d.get("rms_norm_eps", 1e-5),
        weight_tying=d.get("weight_tying", True),
        embedding_size=d.get("embedding_size"),
        init_std=d.get("init_std", 0.02),
        attention=_attention(d),
        block_length=d.get("block_length"),
        mask_token_id=d.get("mask_token_id"),
        eos_token_id=d.get("eos_token_id"),
        pad_token_id=d.get("pad_token_id"),
        bos_token_id=d.get("bos_token_id"),
        extra={k: v for k, v in d.items() if k not in _KNOWN},
    )
