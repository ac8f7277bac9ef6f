"""Checkpoints: save -> load round trips, the LLaDA layout (names, config keys), failures, atomicity."""

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import remask.atomic as atomic
import remask.checkpoint.storage as storage
from remask.checkpoint import (
    checkpoint_bytes,
    from_llada_config,
    from_llada_name,
    load_config,
    load_model,
    save_model,
    to_llada_config,
)
from remask.config import ModelConfig, preset
from remask.errors import RemaskError
from remask.model import Transformer, build_model

VOCAB = 64
# Special-token ids for the tiny vocabulary, defined once here (in real use they come from the tokenizer).
SPECIAL = {"mask": VOCAB - 1, "eos": VOCAB - 2, "pad": VOCAB - 3, "bos": VOCAB - 4}

# The published LLaDA-8B-Base config.json, as released (hand-copied; token ids are that tokenizer's).
LLADA_8B_BASE = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
                 "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 4096,
    "embedding_dropout": 0.0, "embedding_size": 126464, "eos_token_id": 126081, "flash_attention": False,
    "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
    "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
    "layer_norm_with_affine": True, "mask_token_id": 126336, "max_sequence_length": 4096, "mlp_hidden_size": 12288,
    "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None, "n_heads": 32, "n_kv_heads": 32,
    "n_layers": 32, "pad_token_id": 126081, "precision": "amp_bf16", "residual_dropout": 0.0, "rms_norm_eps": 1e-05,
    "rope": True, "rope_full_precision": True, "rope_theta": 500000.0, "scale_logits": False,
    "transformers_version": "4.46.3", "use_cache": False, "vocab_size": 126464, "weight_tying": False,
}


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, mlp_hidden_size=48, max_sequence_length=32)
    return ModelConfig(**(base | kw)).with_tokens(SPECIAL, VOCAB)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids)


def llada_names(n_layers: int, tied: bool) -> set[str]:
    """The tensor names of a published LLaDA checkpoint, written out by hand."""
    names = {"model.transformer.wte.weight", "model.transformer.ln_f.weight"}
    if not tied:
        names.add("model.transformer.ff_out.weight")
    for i in range(n_layers):
        for part in ("attn_norm", "ff_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"):
            names.add(f"model.transformer.blocks.{i}.{part}.weight")
    return names


def stored_names(directory: Path) -> dict[str, str]:
    """Tensor name -> file name, read straight from the safetensors files."""
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            out |= dict.fromkeys(f.keys(), file.name)
    return out


# --- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [{}, {"weight_tying": True}, {"n_kv_heads": 2}, {"attention": "causal"},
                                {"attention": "block", "block_length": 4}],
                         ids=["plain", "tied", "gqa", "causal", "block"])
@pytest.mark.parametrize("shard", [None, 3000], ids=["single", "sharded"])
def test_round_trip_identical_logits(tmp_path, ids, kw, shard):
    model = build_model(tiny(**kw), seed=1)
    expect = logits(model, ids)
    out = save_model(model, tmp_path / "ck", **({"max_shard_bytes": shard} if shard else {}))
    loaded = load_model(out)
    assert loaded.config == model.config
    assert not loaded.training
    assert torch.equal(logits(loaded, ids), expect)
    names = stored_names(out)
    assert set(names) == llada_names(2, tied=kw.get("weight_tying", False))
    if shard is None:
        assert set(names.values()) == {"model.safetensors"}
        assert not (out / "model.safetensors.index.json").exists()
    else:
        assert len(set(names.values())) >= 3


def test_sharded_layout_and_index(tmp_path):
    cfg = tiny()
    limit = 3000  # bytes; the model holds ~86 kB in fp32
    out = save_model(build_model(cfg), tmp_path / "ck", max_shard_bytes=limit)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n >= 3
    assert files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert index["weight_map"] == stored_names(out)  # each tensor lives where the index says
    assert index["metadata"]["total_size"] == 4 * cfg.num_parameters()
    for file in files:  # no shard exceeds the limit unless it holds a single oversized tensor
        tensors = load_file(out / file)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= limit or len(tensors) == 1
        with safe_open(out / file, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
    assert checkpoint_bytes(out) == sum((out / f).stat().st_size for f in files)


def test_bf16_save_and_load(tmp_path, ids):
    model = build_model(tiny(), seed=2)
    expect = logits(build_model(tiny(), seed=2).to(torch.bfloat16), ids)
    out = save_model(model, tmp_path / "ck", dtype=torch.bfloat16, max_shard_bytes=2000)
    assert {t.dtype for f in out.glob("*.safetensors") for t in load_file(f).values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = load_model(out, dtype=torch.bfloat16)
    assert torch.equal(logits(loaded, ids), expect)
    assert {p.dtype for p in load_model(out).parameters()} == {torch.bfloat16}  # dtype=None keeps bf16
    assert {p.dtype for p in load_model(out, dtype=torch.float32).parameters()} == {torch.float32}


def test_load_builds_on_meta_and_assigns(tmp_path, ids, monkeypatch):
    model = build_model(tiny(), seed=3)
    out = save_model(model, tmp_path / "ck")
    init_calls, devices = [], []
    original_init = Transformer.__init__

    def spy_init(self, cfg):
        devices.append(torch.empty(0).device.type)  # the default device while the model is built
        original_init(self, cfg)

    monkeypatch.setattr(Transformer, "__init__", spy_init)
    monkeypatch.setattr(Transformer, "reset_parameters", lambda *a, **k: init_calls.append(1))
    loaded = load_model(out)
    assert devices == ["meta"] and init_calls == []
    params = dict(loaded.named_parameters())
    assert all(p.device.type == "cpu" and isinstance(p, torch.nn.Parameter) and p.requires_grad
               for p in params.values())
    for name, p in model.named_parameters():
        assert torch.equal(params[name], p), name
    assert torch.equal(logits(loaded, ids), logits(model, ids))


# LLaDA tensor name -> the remask parameter it holds, written out by hand (independent of KEY_MAP).
BLOCK_PARTS = {
    "attn_norm": lambda b: b.attn_norm.weight, "ff_norm": lambda b: b.ff_norm.weight,
    "q_proj": lambda b: b.attn.q_proj.weight, "k_proj": lambda b: b.attn.k_proj.weight,
    "v_proj": lambda b: b.attn.v_proj.weight, "attn_out": lambda b: b.attn.attn_out.weight,
    "ff_proj": lambda b: b.mlp.ff_proj.weight, "up_proj": lambda b: b.mlp.up_proj.weight,
    "ff_out": lambda b: b.mlp.ff_out.weight,
}


def by_hand(model: Transformer) -> dict[str, torch.Tensor]:
    out = {"model.transformer.wte.weight": model.wte.weight, "model.transformer.ln_f.weight": model.ln_f.weight}
    if model.ff_out is not None:
        out["model.transformer.ff_out.weight"] = model.ff_out.weight
    for i, block in enumerate(model.blocks):
        out |= {f"model.transformer.blocks.{i}.{part}.weight": get(block) for part, get in BLOCK_PARTS.items()}
    return {k: v.detach().clone() for k, v in out.items()}


@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 2}], ids=["mha", "gqa"])
def test_saved_tensors_sit_under_llada_names(tmp_path, kw):
    model = build_model(tiny(**kw), seed=12)
    out = save_model(model, tmp_path / "ck")
    stored = load_file(out / "model.safetensors")
    expected = by_hand(model)
    assert stored.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(stored[name], tensor), name


def test_llada_written_directory_opens(tmp_path, ids):
    """A directory laid out by hand as LLaDA publishes it (its config keys, its tensor names) loads."""
    model = build_model(tiny(n_kv_heads=2, rope_theta=LLADA_8B_BASE["rope_theta"]), seed=13)
    directory = tmp_path / "llada"
    directory.mkdir()
    tensors = by_hand(model)
    names = sorted(tensors)
    half = {names[k]: "model-00001-of-00002.safetensors" if k % 2 else "model-00002-of-00002.safetensors"
            for k in range(len(names))}
    for file in set(half.values()):
        save_file({n: tensors[n].to(torch.bfloat16) for n in names if half[n] == file}, directory / file,
                  metadata={"format": "pt"})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 0},
                                                                         "weight_map": half}))
    config = LLADA_8B_BASE | {"d_model": 32, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2, "mlp_hidden_size": 48,
                              "max_sequence_length": 32, "vocab_size": VOCAB, "embedding_size": VOCAB,
                              "mask_token_id": SPECIAL["mask"], "eos_token_id": SPECIAL["eos"],
                              "pad_token_id": SPECIAL["pad"]}
    (directory / "config.json").write_text(json.dumps(config))
    loaded = load_model(directory)
    assert loaded.config == model.config.replace(embedding_size=VOCAB, bos_token_id=None)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert torch.equal(logits(loaded, ids), logits(model.to(torch.bfloat16), ids))


def test_tokenizer_saved_alongside(tmp_path):
    class FakeTokenizer:
        def save(self, directory):
            Path(directory, "tokenizer.json").write_text('{"fake": true}')

    out = save_model(build_model(tiny()), tmp_path / "ck", tokenizer=FakeTokenizer())
    assert json.loads((out / "tokenizer.json").read_text()) == {"fake": True}


# --- config.json ---------------------------------------------------------------------------------


def test_config_json_has_llada_keys(tmp_path):
    cfg = tiny(n_kv_heads=2, rope_theta=500_000.0, rms_norm_eps=1e-6)
    data = json.loads((save_model(build_model(cfg), tmp_path / "ck") / "config.json").read_text())
    expected = {
        "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2, "mlp_hidden_size": 48,
        "max_sequence_length": 32, "vocab_size": VOCAB, "embedding_size": None, "rope": True,
        "rope_theta": 500_000.0, "rope_full_precision": True, "rms_norm_eps": 1e-6, "layer_norm_type": "rms",
        "layer_norm_with_affine": True, "include_bias": False, "include_qkv_bias": False,
        "bias_for_layer_norm": False, "block_type": "llama", "activation_type": "silu", "weight_tying": False,
        "alibi": False, "flash_attention": False, "attention_layer_norm": False, "scale_logits": False,
        "block_group_size": 1, "input_emb_norm": False, "multi_query_attention": None, "model_type": "llada",
        "architectures": ["LLaDAModelLM"], "use_cache": False, "init_std": 0.02, "attention": "full",
        "mask_token_id": SPECIAL["mask"], "eos_token_id": SPECIAL["eos"], "pad_token_id": SPECIAL["pad"],
        "bos_token_id": SPECIAL["bos"], "torch_dtype": "float32",
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
                     "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
    }
    assert {k: data.get(k, "<absent>") for k in expected} == expected
    for key in ("mlp_ratio", "embedding_dropout", "attention_dropout", "residual_dropout", "init_device",
                "init_fn", "precision", "transformers_version"):
        assert key in data
    assert load_config(tmp_path / "ck") == cfg


@pytest.mark.parametrize("cfg", [tiny(), tiny(weight_tying=True, attention="causal", embedding_size=80),
                                 tiny(attention="block", block_length=8),
                                 tiny(n_kv_heads=1, extra={"my_note": "kept"}), preset("llada-8b")],
                         ids=["tiny", "tied-causal-padded", "block", "mqa-extra", "llada-8b"])
def test_config_round_trip(cfg):
    assert from_llada_config(json.loads(json.dumps(to_llada_config(cfg)))) == cfg


def test_published_llada_config_loads():
    cfg = from_llada_config(LLADA_8B_BASE)
    expected = preset("llada-8b").replace(embedding_size=126464, mask_token_id=LLADA_8B_BASE["mask_token_id"],
                                          eos_token_id=LLADA_8B_BASE["eos_token_id"],
                                          pad_token_id=LLADA_8B_BASE["pad_token_id"])
    assert cfg == expected
    back = to_llada_config(cfg)
    for key, value in LLADA_8B_BASE.items():  # every published key is written back with its value
        assert back[key] == value, key


@pytest.mark.parametrize("keys, layout", [
    ({}, "full"), ({"causal": False}, "full"), ({"causal": True}, "causal"),
    ({"attention": "causal", "causal": True}, "causal"), ({"attention": "block", "block_length": 4}, "block"),
])
def test_attention_layout_is_read_back_and_older_causal_keys_open_as_before(keys, layout):
    """Model directories written before the layout setting carry `causal` (or nothing: LLaDA's own)."""
    base = to_llada_config(tiny())
    del base["attention"]
    cfg = from_llada_config(base | keys)
    assert cfg.attention == layout and cfg.causal == (layout == "causal")
    assert cfg.block_length == keys.get("block_length")


@pytest.mark.parametrize("keys, fragment", [
    ({"attention": "full", "causal": True}, "attention='full' contradicts causal=True"),
    ({"attention": "block"}, "block_length is required with attention block"),
    ({"attention": "sideways"}, "attention must be one of"),
    ({"causal": 1}, "causal must be true or false"),
])
def test_contradictory_or_incomplete_layouts_are_refused(keys, fragment):
    base = to_llada_config(tiny())
    with pytest.raises(RemaskError, match=fragment):  # ConfigError is one
        from_llada_config(base | keys)


def test_llada_defaults_and_mqa():
    minimal = {"d_model": 32, "n_heads": 4, "n_layers": 2, "vocab_size": VOCAB, "rope": True,
               "layer_norm_type": "rms", "activation_type": "silu", "block_type": "llama"}
    cfg = from_llada_config(minimal)
    assert (cfg.mlp_hidden_size, cfg.weight_tying, cfg.causal, cfg.max_sequence_length) == (4 * 32, True, False, 1024)
    assert from_llada_config(minimal | {"multi_query_attention": True}).effective_n_kv_heads == 1
    assert from_llada_config(minimal | {"mlp_hidden_size": None, "mlp_ratio": 3}).mlp_hidden_size == 96
    with pytest.raises(RemaskError, match="multi_query_attention"):
        from_llada_config(minimal | {"multi_query_attention": True, "n_kv_heads": 2})
    with pytest.raises(RemaskError, match="rope"):
        from_llada_config({k: v for k, v in minimal.items() if k != "rope"})  # LLaDA's default is rope=False


@pytest.mark.parametrize("key,value", [
    ("include_bias", True), ("alibi", True), ("layer_norm_type", "default"), ("layer_norm_type", "gemma_rms"),
    ("activation_type", "swiglu"), ("block_type", "sequential"), ("rope", False), ("attention_layer_norm", True),
    ("scale_logits", True), ("input_emb_norm", True), ("include_qkv_bias", True), ("layer_norm_with_affine", False),
    ("block_group_size", 2), ("bias_for_layer_norm", True),
])
def test_unsupported_architecture_raises(tmp_path, key, value):
    with pytest.raises(RemaskError, match=key):
        from_llada_config(LLADA_8B_BASE | {key: value})
    out = save_model(build_model(tiny()), tmp_path / "ck")
    data = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(data | {key: value}))
    with pytest.raises(RemaskError, match=key):
        load_model(out)


# --- bad checkpoints -----------------------------------------------------------------------------


@pytest.fixture()
def saved(tmp_path) -> Path:
    return save_model(build_model(tiny()), tmp_path / "ck")


@pytest.fixture()
def sharded(tmp_path) -> Path:
    return save_model(build_model(tiny()), tmp_path / "sh", max_shard_bytes=3000)


def one_line_error(directory, match: str) -> str:
    with pytest.raises(RemaskError, match=match) as info:
        load_model(directory)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_directory(tmp_path):
    one_line_error(tmp_path / "nope", "does not exist")


def test_missing_config(saved):
    (saved / "config.json").unlink()
    assert "config.json" in one_line_error(saved, "not found")


def test_corrupt_config(saved):
    (saved / "config.json").write_text('{"d_model": 32,')
    assert "config.json" in one_line_error(saved, "JSON")
    (saved / "config.json").write_text("[1, 2]")
    one_line_error(saved, "JSON object")
    (saved / "config.json").write_text(json.dumps({"d_model": "wide", "n_heads": 4, "n_layers": 2, "vocab_size": 8,
                                                   "rope": True, "layer_norm_type": "rms",
                                                   "activation_type": "silu", "block_type": "llama"}))
    one_line_error(saved, "d_model")


def test_missing_weights(saved):
    (saved / "model.safetensors").unlink()
    one_line_error(saved, "model.safetensors")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors(saved, damage):
    file = saved / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes({"truncate": data[: len(data) - 100], "garbage": b"not a tensor file" * 4, "empty": b""}[damage])
    assert "model.safetensors" in one_line_error(saved, "not a valid safetensors file")


def test_index_points_to_missing_shard(sharded):
    victim = sorted(sharded.glob("model-*.safetensors"))[1]
    victim.unlink()
    assert victim.name in one_line_error(sharded, "not found")


def test_corrupt_index(sharded):
    (sharded / "model.safetensors.index.json").write_text("{not json")
    one_line_error(sharded, "index.json")
    (sharded / "model.safetensors.index.json").write_text('{"metadata": {}}')
    one_line_error(sharded, "weight_map")


def test_index_disagrees_with_shard(sharded):
    path = sharded / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    first, second = sorted(set(index["weight_map"].values()))[:2]
    name = next(k for k, v in index["weight_map"].items() if v == first)
    index["weight_map"][name] = second  # the index now claims the tensor is in the wrong shard
    path.write_text(json.dumps(index))
    assert name in one_line_error(sharded, "not in the file")


def rewrite(directory: Path, change) -> None:
    file = directory / "model.safetensors"
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_shape_mismatch(saved):
    name = "model.transformer.blocks.1.up_proj.weight"
    rewrite(saved, lambda t: t.__setitem__(name, torch.zeros(40, 32)))
    assert name in one_line_error(saved, r"shape \[40, 32\].*\[48, 32\]")


def test_weights_must_be_finite(saved, sharded):
    name = "model.transformer.blocks.1.up_proj.weight"
    rewrite(saved, lambda t: t[name].__setitem__((3, 5), float("nan")))
    err = one_line_error(saved, "holds NaN or infinite values")
    assert err.startswith(f"{saved / 'model.safetensors'}: tensor {name} ")
    # finite as stored but past float16's range (65504), in the last shard: inf once cast, as bad as NaN
    file = sorted(sharded.glob("model-*.safetensors"))[-1]
    tensors = load_file(file)
    last = sorted(tensors)[-1]
    tensors[last][0] = 1e5
    save_file(tensors, file, metadata={"format": "pt"})
    assert load_model(sharded).state_dict()[from_llada_name(last)].max() == 1e5  # float32 holds it
    with pytest.raises(RemaskError, match=f"{file.name}: tensor {last} holds NaN or infinite values once cast to "
                                          "torch.float16"):
        load_model(sharded, dtype=torch.float16)


def test_unexpected_tensor(saved):
    name = "model.transformer.blocks.0.q_proj.bias"
    rewrite(saved, lambda t: t.__setitem__(name, torch.zeros(32)))
    assert name in one_line_error(saved, "unexpected tensor")


def test_missing_tensor(saved):
    name = "model.transformer.ff_out.weight"
    rewrite(saved, lambda t: t.pop(name))
    assert name in one_line_error(saved, "missing tensor")


def test_config_disagrees_with_weights(saved):
    data = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps(data | {"n_layers": 3}))
    one_line_error(saved, "missing tensor model.transformer.blocks.2")
    (saved / "config.json").write_text(json.dumps(data | {"weight_tying": True}))
    one_line_error(saved, "unexpected tensor model.transformer.ff_out.weight")


def test_bad_arguments(tmp_path, saved):
    model = build_model(tiny())
    with pytest.raises(RemaskError, match="max_shard_bytes"):
        save_model(model, tmp_path / "x", max_shard_bytes=0)
    with pytest.raises(RemaskError, match="dtype"):
        save_model(model, tmp_path / "x", dtype=torch.int8)
    with pytest.raises(RemaskError, match="dtype"):
        load_model(saved, dtype=torch.int64)
    with pytest.raises(RemaskError, match="device"):
        load_model(saved, device="no-such-device")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RemaskError, match="not a directory"):
        save_model(model, tmp_path / "file")
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    with pytest.raises(RemaskError, match="not a checkpoint"):
        save_model(model, keep)
    assert (keep / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "x").exists()


# --- atomicity -----------------------------------------------------------------------------------


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith((".tmp-", ".trash-"))]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_failed_save_leaves_previous_checkpoint(tmp_path, ids, monkeypatch):
    old_model = build_model(tiny(), seed=4)
    target = save_model(old_model, tmp_path / "ck", max_shard_bytes=3000)
    before = snapshot(target)
    real_save, calls = storage.save_file, []

    def failing_save(tensors, path, **kw):  # the disk fills up on the second shard
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_save(tensors, path, **kw)

    monkeypatch.setattr(storage, "save_file", failing_save)
    with pytest.raises(RemaskError, match="cannot write .*ck: no space left on device"):
        save_model(build_model(tiny(), seed=5), target, max_shard_bytes=3000)
    assert len(calls) == 2
    assert snapshot(target) == before
    assert leftovers(tmp_path) == []
    assert torch.equal(logits(load_model(target), ids), logits(old_model, ids))

    calls.clear()
    with pytest.raises(RemaskError, match="no space left"):  # a fresh target never appears either
        save_model(build_model(tiny()), tmp_path / "fresh", max_shard_bytes=3000)
    assert not (tmp_path / "fresh").exists() and leftovers(tmp_path) == []


def test_failed_swap_restores_previous_checkpoint(tmp_path, ids, monkeypatch):
    old_model = build_model(tiny(), seed=6)
    target = save_model(old_model, tmp_path / "ck")
    before = snapshot(target)
    real_rename = os.rename

    def rename(src, dst):  # moving the old one aside works; moving the new one in fails
        if Path(src).name.startswith(".tmp-ck-"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(RemaskError, match="cannot write .*ck: input/output error"):
        save_model(build_model(tiny(), seed=7), target)
    monkeypatch.undo()
    assert snapshot(target) == before
    assert leftovers(tmp_path) == []
    assert torch.equal(logits(load_model(target), ids), logits(old_model, ids))


def test_interrupted_save_cleans_up(tmp_path, monkeypatch):
    target = save_model(build_model(tiny(), seed=8), tmp_path / "ck")
    before = snapshot(target)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "_finish_tree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_model(build_model(tiny(), seed=9), target)
    assert snapshot(target) == before and leftovers(tmp_path) == []


def test_replacing_checkpoint_succeeds(tmp_path, ids):
    target = save_model(build_model(tiny(), seed=10), tmp_path / "ck", max_shard_bytes=3000)
    new = build_model(tiny(), seed=11)
    save_model(new, target)  # sharded -> single file: no stale shard or index survives
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert leftovers(tmp_path) == []
    assert torch.equal(logits(load_model(target), ids), logits(new, ids))


def test_every_file_of_a_checkpoint_has_the_same_mode(tmp_path):
    from remask.atomic import DIR_MODE, FILE_MODE

    target = save_model(build_model(tiny()), tmp_path / "ck", max_shard_bytes=3000)
    modes = {p.name: p.stat().st_mode & 0o777 for p in target.iterdir()}
    assert set(modes.values()) == {FILE_MODE}, modes  # safetensors alone would write its files 0600
    assert target.stat().st_mode & 0o777 == DIR_MODE
