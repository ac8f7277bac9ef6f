"""Checkpoints in the LLaDA Hugging Face layout: `llada` translates names and config.json,
`storage` reads, validates and writes the safetensors files, `model_dir` loads weights and
tokenizer together."""

from remask.checkpoint.llada import KEY_MAP, from_llada_config, from_llada_name, to_llada_config, to_llada_name
from remask.checkpoint.model_dir import check_tokenizer, load_model_dir
from remask.checkpoint.storage import (
    CONFIG_NAME,
    INDEX_NAME,
    WEIGHTS_NAME,
    check_save_target,
    checkpoint_bytes,
    load_config,
    load_model,
    save_model,
    write_model_files,
)

__all__ = [
    "CONFIG_NAME",
    "INDEX_NAME",
    "KEY_MAP",
    "WEIGHTS_NAME",
    "check_save_target",
    "check_tokenizer",
    "checkpoint_bytes",
    "from_llada_config",
    "from_llada_name",
    "load_config",
    "load_model",
    "load_model_dir",
    "save_model",
    "to_llada_config",
    "to_llada_name",
    "write_model_files",
]
