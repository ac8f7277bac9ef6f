"""Tokenizer: a HuggingFace `tokenizers.Tokenizer` that knows its special tokens by name.

Special tokens are addressed by the names in `SPECIAL_NAMES`; their strings live in one map
(name -> token string) that is saved next to `tokenizer.json`, so no id is ever written as a
literal. The defaults are LLaDA's strings (arXiv 2502.09992; the released tokenizer), and pad
falls back to EOS because LLaDA pads with EOS (section 2.3 of the paper: SFT appends EOS
tokens to short answers). Chat turns are rendered with LLaDA's Llama-3-style template.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers

from remask.errors import RemaskError

SPECIAL_NAMES = ("mask", "eos", "pad", "bos", "eot", "start_header", "end_header")
REQUIRED_NAMES = ("mask", "eos")
# LLaDA's strings; pad is absent on purpose: it shares the EOS token.
DEFAULT_SPECIAL_TOKENS: dict[str, str] = {
    "mask": "<|mdm_mask|>",
    "eos": "<|endoftext|>",
    "bos": "<|startoftext|>",
    "eot": "<|eot_id|>",
    "start_header": "<|start_header_id|>",
    "end_header": "<|end_header_id|>",
}
UNK_TOKEN = "<|unk|>"  # char tokenizers only: stands for characters absent from training
CHAT_ROLES = ("system", "user", "assistant")
HF_KEYS = {"bos": "bos_token", "eos": "eos_token", "pad": "pad_token", "mask": "mask_token"}
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
CONFIG_MAP_KEY = "remask_special_tokens"


class Tokenizer:
    """A `tokenizers.Tokenizer` plus a name -> token-string map for the special tokens.

    Construction checks that `mask` and `eos` exist and that every mapped string is in the
    vocabulary, and registers each mapped string as a special added token (so it is never
    split and `decode(skip_special=True)` drops it). `backend` is modified in place.
    """

    def __init__(self, backend: tokenizers.Tokenizer, special_tokens: dict[str, str]) -> None:
        unknown = sorted(set(special_tokens) - set(SPECIAL_NAMES))
        if unknown:
            raise RemaskError(f"unknown special-token name(s) {', '.join(unknown)}; known: {', '.join(SPECIAL_NAMES)}")
        for name in REQUIRED_NAMES:
            if name not in special_tokens:
                raise RemaskError(f"tokenizer has no {name} token (LLaDA's is {DEFAULT_SPECIAL_TOKENS[name]!r})")
        for name, token in special_tokens.items():
            if not isinstance(token, str) or backend.token_to_id(token) is None:
                raise RemaskError(f"special token {name}={token!r} is not in the tokenizer's vocabulary")
        backend.encode_special_tokens = True  # special strings in text stay text (see the module doc)
        self.backend = backend
        self._tokens = dict(special_tokens)
        registered = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
        missing = [t for t in dict.fromkeys(self._tokens.values()) if t not in registered]
        if missing:  # ids are unchanged: the strings are already in the vocabulary
            backend.add_special_tokens(_special_added_tokens(missing))
        self._special_set = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self._ids = {name: None if tok is None else backend.token_to_id(tok)
                     for name, tok in self.special_tokens.items()}

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, special_ids={self.special_ids})"

    # --- loading and saving ----------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` (+ `tokenizer_config.json`) from a model directory.

        Special tokens come from the config's `remask_special_tokens` map if present; else,
        per name, from the HF keys (`bos_token`, ...) or LLaDA's default string when it is in
        the vocabulary. Raises RemaskError when a file is missing or corrupt.
        """
        directory = Path(path)
        file = directory / TOKENIZER_FILE
        if not file.is_file():
            raise RemaskError(f"no {TOKENIZER_FILE} in {directory}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as exc:  # the Rust side raises a bare Exception
            detail = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise RemaskError(f"{file} is not a valid tokenizer file: {detail}") from None
        config = _read_config(directory / CONFIG_FILE)
        return cls(backend, _resolve_special_tokens(config, backend))

    def save(self, directory: str | Path, *, model_max_length: int | None = None) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` (HF keys + the name map)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(out / TOKENIZER_FILE))
        config: dict[str, Any] = {key: self._tokens.get(name) for name, key in HF_KEYS.items()}
        config["pad_token"] = self.special_tokens["pad"]
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        if model_max_length is not None:
            config["model_max_length"] = model_max_length
        config[CONFIG_MAP_KEY] = self._tokens
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    # --- training ----------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], *, kind: Literal["char", "bpe"] = "char", vocab_size: int = 4096,
              min_frequency: int = 1) -> Tokenizer:
        """Train a tokenizer with LLaDA's special tokens at the first ids; deterministic.

        `char`: one token per character (most frequent first, at most `vocab_size` in all,
        unseen characters -> `<|unk|>`). `bpe`: byte-level BPE, lossless on any string.
        """
        if kind not in ("char", "bpe"):
            raise RemaskError(f"unknown tokenizer kind {kind!r}; choose char or bpe")
        if not isinstance(min_frequency, int) or min_frequency < 1:
            raise RemaskError(f"min_frequency must be a positive integer, got {min_frequency!r}")
        texts = list(texts)
        for i, text in enumerate(texts):
            check_text(text, f"training text {i}")
        specials = list(DEFAULT_SPECIAL_TOKENS.values())
        build = _train_char if kind == "char" else _train_bpe
        return cls(build(texts, specials, vocab_size, min_frequency), dict(DEFAULT_SPECIAL_TOKENS))

    # --- encoding ------------------------------------------------------------------------------
    def encode(self, text: str, *, where: str = "text") -> list[int]:
        """Ids of `text` as plain text (special-token strings inside it are not special); no BOS/EOS
        added. `where` names the text in the error raised for invalid input."""
        return self.backend.encode(check_text(text, where), add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        """Text of `ids`; special tokens dropped when `skip_special`. Ids outside the vocabulary
        (e.g. padded embedding rows) decode to nothing."""
        size = self.vocab_size
        kept = [int(i) for i in ids if 0 <= int(i) < size]
        return self.backend.decode(kept, skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def is_special(self, token_id: int) -> bool:
        """True for the ids of special added tokens (all named special tokens among them)."""
        return int(token_id) in self._special_set

    # --- special tokens by name -------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[str, str | None]:
        """Name -> token string for every name in SPECIAL_NAMES (pad falls back to eos)."""
        out = {name: self._tokens.get(name) for name in SPECIAL_NAMES}
        out["pad"] = out["pad"] or out["eos"]
        return out

    @property
    def special_ids(self) -> dict[str, int | None]:
        """Name -> id for every name in SPECIAL_NAMES; None where the tokenizer has no such token."""
        return dict(self._ids)

    def _id(self, name: str) -> int | None:
        return self._ids[name]

    @property
    def mask_id(self) -> int:
        return self._id("mask")

    @property
    def eos_id(self) -> int:
        return self._id("eos")

    @property
    def pad_id(self) -> int:
        return self._id("pad")

    @property
    def bos_id(self) -> int | None:
        return self._id("bos")

    @property
    def eot_id(self) -> int | None:
        return self._id("eot")

    # --- chat -------------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict], *, add_generation_prompt: bool = False) -> list[int]:
        """Ids of LLaDA's chat template: bos, then per message
        `<start_header>{role}<end_header>\\n\\n{content.strip()}<eot>`; with `add_generation_prompt`
        an open assistant header follows."""
        return [i for ids, _ in self._chat_segments(messages, add_generation_prompt) for i in ids]

    def chat_turns(self, messages: list[dict]) -> list[tuple[list[int], bool]]:
        """`render_chat(messages)` cut into consecutive segments, flagged True exactly on each
        assistant answer (its content + eot: the tokens SFT trains on, LLaDA section 2.3)."""
        return self._chat_segments(messages, False)

    def _chat_segments(self, messages: list[dict], add_generation_prompt: bool) -> list[tuple[list[int], bool]]:
        _check_messages(messages)
        ids = self._ids
        for name in ("eot", "start_header", "end_header"):
            if ids[name] is None:
                raise RemaskError(f"tokenizer has no {name} token, so it cannot render chat turns")
        pieces: list[tuple[list[int], bool]] = [([ids["bos"]] if ids["bos"] is not None else [], False)]
        for i, message in enumerate(messages):
            pieces.append((self._header(message["role"]), False))
            answer = message["role"] == "assistant"
            pieces.append((self.encode(message["content"].strip(), where=f"chat message {i}") + [ids["eot"]], answer))
        if add_generation_prompt:
            pieces.append((self._header("assistant"), False))
        return _merge(pieces)

    def _header(self, role: str) -> list[int]:
        # The end-header token splits the text, so "\n\n" is encoded on its own, exactly as when
        # the whole rendered string is encoded (added tokens are cut out before pre-tokenizing).
        ids = self._ids
        return [ids["start_header"]] + self.encode(role) + [ids["end_header"]] + self.encode("\n\n")


# --- helpers ---------------------------------------------------------------------------------------
def check_text(text: object, where: str) -> str:
    """`text` if it is a str of valid UTF-8 text; else a RemaskError naming `where`."""
    if not isinstance(text, str):
        raise RemaskError(f"{where} must be text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RemaskError(f"{where} is not valid UTF-8 text (undecodable data at character {e.start})") from None
    return text


def decode_utf8(data: bytes, where: str) -> str:
    """Strictly decoded UTF-8; a RemaskError naming `where` and the byte offset otherwise."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RemaskError(f"{where} is not valid UTF-8 text (byte {e.start})") from None


def _merge(pieces: list[tuple[list[int], bool]]) -> list[tuple[list[int], bool]]:
    """Join consecutive pieces with the same flag; drop empty ones."""
    out: list[tuple[list[int], bool]] = []
    for ids, flag in pieces:
        if not ids:
            continue
        if out and out[-1][1] == flag:
            out[-1][0].extend(ids)
        else:
            out.append((list(ids), flag))
    return out


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list):
        raise RemaskError(f"chat messages must be a list of dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RemaskError(f"chat message {i} must be a dict, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise RemaskError(f"chat message {i} has role {role!r}; choose from {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise RemaskError(f"chat message {i} needs a string 'content', got {type(content).__name__}")


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RemaskError(f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict):
        raise RemaskError(f"{path} must hold a JSON object")
    return config


def _hf_token(value: Any, key: str) -> str | None:
    """An HF config token entry: a string, a dict with "content", or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise RemaskError(f"{CONFIG_FILE}: {key} must be a string or an object with 'content'")


def _resolve_special_tokens(config: dict[str, Any], backend: tokenizers.Tokenizer) -> dict[str, str]:
    """The name map: remask's own if saved, else HF keys, else LLaDA defaults found in the vocabulary."""
    if CONFIG_MAP_KEY in config:
        names = config[CONFIG_MAP_KEY]
        if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
            raise RemaskError(f"{CONFIG_FILE}: {CONFIG_MAP_KEY} must map names to token strings")
        return dict(names)
    found: dict[str, str] = {}
    for name in SPECIAL_NAMES:
        token = _hf_token(config.get(HF_KEYS[name]), HF_KEYS[name]) if name in HF_KEYS else None
        default = DEFAULT_SPECIAL_TOKENS.get(name)
        if token is None and default is not None and backend.token_to_id(default) is not None:
            token = default
        if token is not None:
            found[name] = token
    return found


def _special_added_tokens(specials: list[str]) -> list[AddedToken]:
    return [AddedToken(t, special=True, normalized=False) for t in specials]


def _train_char(texts: list[str], specials: list[str], vocab_size: int, min_frequency: int) -> tokenizers.Tokenizer:
    """WordLevel over single characters: specials, then <|unk|>, then characters by frequency."""
    room = vocab_size - len(specials) - 1
    if room < 1:
        raise RemaskError(f"vocab_size {vocab_size} is too small: {len(specials) + 1} ids go to special tokens")
    counts = Counter(ch for text in texts for ch in text)
    # The chat template's role names and newline stay encodable even when training text lacks them.
    forced = sorted(set("".join(CHAT_ROLES) + "\n"))[:room]
    others = [c for c, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
              if n >= min_frequency and c not in forced]
    chars = sorted(forced + others[: room - len(forced)], key=lambda c: (-counts[c], c))
    vocab = {tok: i for i, tok in enumerate([*specials, UNK_TOKEN, *chars])}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one piece per char
    backend.decoder = decoders.Fuse()  # join the characters back with nothing in between
    backend.add_special_tokens(_special_added_tokens(specials))
    return backend


def _train_bpe(texts: list[str], specials: list[str], vocab_size: int, min_frequency: int) -> tokenizers.Tokenizer:
    """Byte-level BPE: the 256-byte alphabet makes every string encodable and decodable."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise RemaskError(f"vocab_size {vocab_size} is too small for byte-level BPE "
                          f"(needs at least {len(alphabet) + len(specials)})")
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=_special_added_tokens(specials), initial_alphabet=alphabet)
    backend.train_from_iterator(texts, trainer=trainer)
    return backend
