"""Corpus reading, tokenizers, the token cache and the train/validation split."""

import gzip
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

import bmojo.data as data_mod
from bmojo.data import ByteTokenizer, DataError, HFTokenizer, load_corpus, load_tokenizer, split_tail

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
GPT2 = SHARED / "gpt2_tokenizer"
EOS = 256


def _load(paths, cache, **kw):
    return load_corpus(paths, kw.pop("tokenizer", None), cache_dir=cache, progress=False, **kw)


def _byte_join(docs: list[str]) -> list[int]:
    """The byte-tokenizer stream of ``docs``: UTF-8 bytes with eos (256) between documents."""
    out: list[int] = []
    for i, d in enumerate(docs):
        out += ([EOS] if i else []) + list(d.encode("utf-8"))
    return out


def _docs(tokens: np.ndarray) -> list[str]:
    """Split a byte-tokenizer stream at eos back into documents."""
    parts, cur = [], []
    for t in tokens.tolist():
        if t == EOS:
            parts.append(bytes(cur).decode())
            cur = []
        else:
            cur.append(t)
    return parts + [bytes(cur).decode()]


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _write_formats(folder: Path) -> dict[str, list[str]]:
    """One file of each format in ``folder``; returns file name -> its documents in reading order."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "a.txt": ["Plain text, two lines.\nSecond línea.\n"],
        "b.txt.gz": ["gzipped text\n"],
        "c.jsonl": ["first record", "second record ✓"],
        "d.jsonl.gz": ["gzipped record"],
        "e.zip": ["zip member one\n", "zip json record"],
    }
    (folder / "a.txt").write_text(files["a.txt"][0], encoding="utf-8")
    (folder / "b.txt.gz").write_bytes(gzip.compress(files["b.txt.gz"][0].encode()))
    (folder / "c.jsonl").write_bytes(_jsonl([{"text": t, "id": i} for i, t in enumerate(files["c.jsonl"])]))
    (folder / "d.jsonl.gz").write_bytes(gzip.compress(_jsonl([{"text": files["d.jsonl.gz"][0]}])))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("inner/one.txt", files["e.zip"][0])
        z.writestr("inner/two.jsonl", _jsonl([{"text": files["e.zip"][1]}]))
        z.writestr("inner/", "")
    (folder / "e.zip").write_bytes(buf.getvalue())
    return files


@pytest.mark.parametrize("name", ["a.txt", "b.txt.gz", "c.jsonl", "d.jsonl.gz", "e.zip"])
def test_each_format_reads_its_documents(tmp_path, name):
    docs = _write_formats(tmp_path / "src")[name]
    corpus = _load(tmp_path / "src" / name, tmp_path / "cache", val_fraction=0.0)
    assert corpus.train.tolist() == _byte_join(docs)
    assert corpus.num_bytes_train == sum(len(d.encode()) for d in docs)
    assert len(corpus.val) == 0 and corpus.num_bytes_val == 0


def test_directory_reads_every_file_in_path_order(tmp_path):
    files = _write_formats(tmp_path / "src")
    (tmp_path / "src" / "notes.md").write_text("not a corpus file")
    (tmp_path / "src" / ".hidden.txt").write_text("hidden")
    corpus = _load(tmp_path / "src", tmp_path / "cache", val_fraction=0.0)
    expected = [d for name in sorted(files) for d in files[name]]
    assert isinstance(corpus.train, np.memmap) and corpus.train.dtype == np.uint16
    assert _docs(corpus.train) == expected
    assert corpus.manifest["documents_per_source"] == [len(files[n]) for n in sorted(files)]


def test_invalid_utf8_error_names_file_and_offset(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"hello \xff world")
    with pytest.raises(DataError, match=r"bad\.txt: invalid UTF-8 at byte offset 6"):
        _load(tmp_path / "bad.txt", tmp_path / "cache")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("ok.txt", "fine")
        z.writestr("worse.txt", b"abc\xc3(")
    (tmp_path / "arch.zip").write_bytes(buf.getvalue())
    with pytest.raises(DataError, match=r"arch\.zip:worse\.txt: invalid UTF-8 at byte offset 3"):
        _load(tmp_path / "arch.zip", tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # nothing written for a source that fails


@pytest.mark.parametrize("errors", ["replace", "ignore"])
def test_errors_option_decodes_like_python(tmp_path, errors):
    raw = b"caf\xc3\xa9 \xff\xfe ok"
    (tmp_path / "bad.txt").write_bytes(raw)
    corpus = _load(tmp_path / "bad.txt", tmp_path / "cache", val_fraction=0.0, errors=errors)
    assert corpus.train.tolist() == list(raw.decode("utf-8", errors=errors).encode())
    with pytest.raises(DataError, match="errors must be one of"):
        _load(tmp_path / "bad.txt", tmp_path / "cache", errors="surrogateescape")


def test_empty_missing_and_unsupported_sources(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.txt is empty"):
        _load(tmp_path / "empty.txt", tmp_path / "cache")
    (tmp_path / "empty.txt.gz").write_bytes(gzip.compress(b""))
    with pytest.raises(DataError, match="empty after decompression"):
        _load(tmp_path / "empty.txt.gz", tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        _load(tmp_path / "nope.txt", tmp_path / "cache")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError, match="holds no files"):
        _load(tmp_path / "emptydir", tmp_path / "cache")
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(DataError, match="unsupported file type"):
        _load(tmp_path / "data.csv", tmp_path / "cache")
    (tmp_path / "broken.txt.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="not a valid gzip"):
        _load(tmp_path / "broken.txt.gz", tmp_path / "cache")


def test_jsonl_errors_name_the_line(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n\n{"body": "b"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl, line 3: no 'text' field"):
        _load(tmp_path / "d.jsonl", tmp_path / "cache")
    (tmp_path / "e.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match=r"e\.jsonl, line 2: not valid JSON"):
        _load(tmp_path / "e.jsonl", tmp_path / "cache")
    (tmp_path / "f.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(DataError, match=r"f\.jsonl, line 1: 'text' is int"):
        _load(tmp_path / "f.jsonl", tmp_path / "cache")
    (tmp_path / "g.jsonl").write_text('{"body": "b", "text": 1}\n{"body": "c"}\n')
    corpus = _load(tmp_path / "g.jsonl", tmp_path / "cache", text_field="body", val_fraction=0.0)
    assert _docs(corpus.train) == ["b", "c"]


def test_bad_tokenizer_paths(tmp_path):
    with pytest.raises(DataError, match="neither 'byte' nor an existing path"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot load a tokenizer from .*tokenizer.json"):
        load_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="cannot load a tokenizer from .*empty"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "text.txt").write_text("hello")
    with pytest.raises(DataError, match="cannot load"):
        _load(tmp_path / "text.txt", tmp_path / "cache", tokenizer=tmp_path / "tokenizer.json")


def test_byte_tokenizer_round_trip_and_save(tmp_path):
    tok = load_tokenizer(None)
    text = "naïve ✓ text"
    assert tok.encode(text) == list(text.encode()) and tok.decode(tok.encode(text) + [EOS]) == text
    assert (tok.vocab_size, tok.eos_id, tok.name) == (257, 256, "byte")
    tok.save(tmp_path / "model")
    assert isinstance(load_tokenizer(tmp_path / "model"), ByteTokenizer)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)


class CountingTokenizer(ByteTokenizer):
    """A byte tokenizer that counts its batch-encoding calls and can fail on a given call."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.calls, self.fail_on = 0, fail_on

    def encode_batch(self, texts):
        self.calls += 1
        if self.calls == self.fail_on:
            raise KeyboardInterrupt("simulated interruption")
        return super().encode_batch(texts)


def _three_docs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        (folder / f"doc{i}.txt").write_text(f"document number {i}\n" * (i + 2))
    return folder


def test_cache_is_reused_when_unchanged_and_rebuilt_when_a_source_changes(tmp_path):
    src = _three_docs(tmp_path / "src")
    tok = CountingTokenizer()
    first = _load(src, tmp_path / "cache", tokenizer=tok, val_fraction=0.34)
    assert first.built and tok.calls == 2  # one batch per split
    mtime = os.stat(first.path / "train.bin").st_mtime_ns
    second = _load(src, tmp_path / "cache", tokenizer=tok, val_fraction=0.34)
    assert not second.built and tok.calls == 2
    assert os.stat(second.path / "train.bin").st_mtime_ns == mtime
    assert second.path == first.path and np.array_equal(second.train, first.train)
    (src / "doc1.txt").write_text("Document number 1\n" * 3)  # same size, different bytes
    third = _load(src, tmp_path / "cache", tokenizer=tok, val_fraction=0.34)
    assert third.built and tok.calls == 4
    assert "Document number 1\n" * 3 in _docs(np.concatenate([third.train, [EOS], third.val]))
    (src / "doc3.txt").write_text("a new document\n")
    fourth = _load(src, tmp_path / "cache", tokenizer=tok, val_fraction=0.34)
    assert fourth.built and fourth.path == first.path and fourth.manifest["documents_per_source"] == [1, 1, 1, 1]
    other = _load(src, tmp_path / "cache", tokenizer=tok, val_fraction=0.34, seed=1)
    assert other.built and other.path != third.path  # other split settings: another cache entry


def test_interrupted_or_damaged_cache_is_rebuilt(tmp_path):
    src = _three_docs(tmp_path / "src")
    with pytest.raises(KeyboardInterrupt):
        _load(src, tmp_path / "cache", tokenizer=CountingTokenizer(fail_on=2), val_fraction=0.34)
    (folder,) = (tmp_path / "cache" / "data").iterdir()
    assert not (folder / "manifest.json").exists() and not list(folder.glob("*.tmp"))
    good = _load(src, tmp_path / "cache", tokenizer=CountingTokenizer(), val_fraction=0.34)
    assert good.built and good.path == folder
    expected = good.train.tolist()

    (folder / "manifest.json").unlink()
    (folder / "train.bin.abc.tmp").write_bytes(b"leftover")
    again = _load(src, tmp_path / "cache", val_fraction=0.34)
    assert again.built and again.train.tolist() == expected and not list(folder.glob("*.tmp"))

    with open(folder / "train.bin", "r+b") as f:
        f.truncate(10)
    assert _load(src, tmp_path / "cache", val_fraction=0.34).built
    (folder / "manifest.json").write_text('{"half": ')
    repaired = _load(src, tmp_path / "cache", val_fraction=0.34)
    assert repaired.built and repaired.train.tolist() == expected


def test_document_split_is_deterministic_disjoint_and_complete(tmp_path):
    docs = [f"document {i}: " + "word " * (i % 7 + 1) for i in range(20)]
    (tmp_path / "d.jsonl").write_bytes(_jsonl([{"text": d} for d in docs]))
    a = _load(tmp_path / "d.jsonl", tmp_path / "c1", val_fraction=0.2, seed=0)
    b = _load(tmp_path / "d.jsonl", tmp_path / "c2", val_fraction=0.2, seed=0)
    c = _load(tmp_path / "d.jsonl", tmp_path / "c3", val_fraction=0.2, seed=1)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    train, val = _docs(a.train), _docs(a.val)
    assert len(val) == 4 and len(train) == 16
    assert sorted(train + val) == sorted(docs) and not set(train) & set(val)
    assert train == [d for d in docs if d in train] and val == [d for d in docs if d in val]  # original order
    assert set(_docs(c.val)) != set(val)
    assert a.num_bytes_val == sum(len(d.encode()) for d in val)
    assert a.num_bytes_train == sum(len(d.encode()) for d in train)


def test_single_document_splits_at_a_line_start_in_the_tail(tmp_path):
    text = "".join(f"line {i} of the only document\n" for i in range(200))
    (tmp_path / "one.txt").write_text(text)
    corpus = _load(tmp_path / "one.txt", tmp_path / "cache", val_fraction=0.1)
    head, tail = bytes(corpus.train.tolist()).decode(), bytes(corpus.val.tolist()).decode()
    assert head + tail == text and head.endswith("\n") and tail.startswith("line ")
    assert 0.09 * len(text) <= len(tail) <= 0.11 * len(text)
    assert split_tail("ab", 0.5) == ("a", "b") and split_tail("x", 0.5) == ("x", "")


def _tiny_bpe(folder: Path) -> Path:
    """Train a small byte-level BPE tokenizer (GPT-2 pre-tokenization) and save it as ``folder/tokenizer.json``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(["the cat sat on the mat\n", "the dog sat\n  on the log\n"] * 20, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def test_hf_tokenizer_from_local_file_or_folder(tmp_path, monkeypatch):
    from tokenizers import Tokenizer

    path = _tiny_bpe(tmp_path / "bpe")
    raw = Tokenizer.from_file(str(path))
    text = "the cat\nsat on\n\n  the log\nthe mat ✓ \nx\r\ny 12 34.\n" * 5
    for spec in (path, path.parent, str(path.parent)):
        tok = load_tokenizer(spec)
        assert isinstance(tok, HFTokenizer) and tok.encode(text) == raw.encode(text, add_special_tokens=False).ids
        assert tok.eos_id == raw.token_to_id("<|endoftext|>") and tok.vocab_size == raw.get_vocab_size()
    pieces = data_mod._pieces(text, 7)
    assert len(pieces) > 20 and "".join(pieces) == text
    pre = raw.pre_tokenizer  # pre-tokenizing the pieces one by one gives the pre-tokens of the whole text
    assert [t for p in pieces for t, _ in pre.pre_tokenize_str(p)] == [t for t, _ in pre.pre_tokenize_str(text)]
    monkeypatch.setattr(data_mod, "PIECE_CHARS", 7)  # cut long texts into many pieces: ids must not change
    assert [a.tolist() for a in tok.encode_batch([text, "x"])] == [tok.encode(text), tok.encode("x")]
    assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path / "saved")
    back = load_tokenizer(tmp_path / "saved")
    assert back.encode(text) == tok.encode(text) and back.eos_id == tok.eos_id
    assert back.fingerprint() == tok.fingerprint()
    (tmp_path / "bpe" / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "the"}}))
    assert load_tokenizer(path.parent).eos_id == raw.token_to_id("the")


def test_hf_corpus_joins_documents_with_eos(tmp_path):
    path = _tiny_bpe(tmp_path / "bpe")
    tok = load_tokenizer(path)
    (tmp_path / "d.jsonl").write_bytes(_jsonl([{"text": "the cat sat"}, {"text": "on the mat"}]))
    corpus = _load(tmp_path / "d.jsonl", tmp_path / "cache", tokenizer=path, val_fraction=0.0)
    assert corpus.train.tolist() == tok.encode("the cat sat") + [tok.eos_id] + tok.encode("on the mat")
    assert corpus.manifest["tokenizer_fingerprint"] == tok.fingerprint()


@pytest.mark.skipif(not GPT2.is_dir(), reason="shared GPT-2 tokenizer not present")
def test_gpt2_tokenizer_on_shared_corpus(tmp_path):
    from tokenizers import Tokenizer

    tok = load_tokenizer(GPT2)
    assert (tok.vocab_size, tok.eos_id) == (50257, 50256)
    assert tok.encode("Hello world") == [15496, 995]
    plays = SHARED / "shakespeare" / "eight_plays.txt"
    corpus = _load(plays, tmp_path / "cache", tokenizer=GPT2, val_fraction=0.0)
    assert len(corpus.train) == 323_598  # the count in shared/data/README.md
    text = plays.read_text(encoding="utf-8")
    assert corpus.train.tolist() == Tokenizer.from_file(str(GPT2 / "tokenizer.json")).encode(text).ids
    assert corpus.num_bytes_train == 1_036_489
