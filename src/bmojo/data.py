"""Language-model data: tokenizers, corpus readers and a memory-mapped token cache.

Sources are ``.txt``, ``.txt.gz``, ``.jsonl`` / ``.jsonl.gz`` (one document per line, a ``text`` field), ``.zip``
archives of such files, or directories holding them (read recursively, sorted by path). A text file is one
document. Token ids are cached under ``cache_dir`` as ``train.bin`` / ``val.bin`` (raw ``uint16`` or ``uint32``)
beside ``manifest.json`` (sources with sizes and SHA-256, tokenizer, split, counts). The manifest is written last
and every file goes through a temporary file, ``fsync`` and ``rename``, so an interrupted build is never taken for
a complete cache; a cache whose sources, tokenizer or split settings changed is rebuilt.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bmojo.atomic import atomic_file, atomic_write, fsync_path, sha256_file

SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".zip")
ERRORS = ("strict", "replace", "ignore")
MARKER = "bmojo_tokenizer.json"  # written by ``Tokenizer.save``; says which tokenizer a folder holds
CACHE_VERSION = 1
PIECE_CHARS = 1 << 18  # long documents are tokenized in pieces of about this many characters, in parallel
CUT = re.compile(r"(?<=\S)[ \n](?=\S)")  # where long documents may be cut (see HFTokenizer.encode_batch)
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")


class DataError(ValueError):
    """A source, tokenizer or cache that cannot be used, with the reason and where."""


# ---------------------------------------------------------------------------------------------------- tokenizers


class ByteTokenizer:
    """UTF-8 bytes as ids ``0..255`` plus ``eos = 256`` (``vocab_size = 257``); needs no files."""

    name = "byte"
    vocab_size = 257
    eos_id: int | None = 256

    def encode(self, text: str) -> list[int]:
        """Ids of the UTF-8 bytes of ``text``."""
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """``encode`` of each text as a ``uint16`` array."""
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.uint16) for t in texts]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of the byte ids (eos dropped, invalid UTF-8 replaced by U+FFFD)."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return "byte"

    def save(self, folder: str | Path) -> Path:
        """Write the marker file so that ``load_tokenizer(folder)`` gives a byte tokenizer back."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / MARKER, json.dumps({"type": "byte", "vocab_size": 257, "eos_id": 256}).encode())
        return folder


class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` (from a ``tokenizer.json``) with the interface of ``ByteTokenizer``.

    ``encode`` adds no special tokens. ``eos_id`` comes from ``tokenizer_config.json``'s ``eos_token`` when
    present, else from the first of ``<|endoftext|>, </s>, <|end_of_text|>, <eos>, <|eos|>`` in the vocabulary.
    """

    def __init__(self, tokenizer: Any, name: str, eos_id: int | None) -> None:
        self._tok = tokenizer
        self.name = name
        self.eos_id = eos_id
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
        self._piecewise = _splits_at_line_starts(json.loads(tokenizer.to_str()).get("pre_tokenizer"))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """``encode`` of each text as an integer array, in parallel over texts and over pieces of long texts.

        Pieces are cut only before a single space or newline between non-space characters, and only for byte-level
        pre-tokenizers without a prefix space (GPT-2, Llama 3), whose pre-tokens never span such a point: the ids
        equal ``encode``.
        """
        pieces: list[str] = []
        owner: list[int] = []
        for i, text in enumerate(texts):
            parts = _pieces(text, PIECE_CHARS) if self._piecewise else [text]
            pieces.extend(parts)
            owner.extend([i] * len(parts))
        encoded = self._tok.encode_batch_fast(pieces, add_special_tokens=False) if pieces else []
        out: list[list[np.ndarray]] = [[] for _ in texts]
        for i, enc in zip(owner, encoded):
            out[i].append(np.asarray(enc.ids, dtype=np.uint32))
        return [np.concatenate(parts) if parts else np.zeros(0, np.uint32) for parts in out]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of the ids (special tokens dropped)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def fingerprint(self) -> str:
        """SHA-256 of the serialised tokenizer and the eos id: equal fingerprints tokenize identically."""
        return hashlib.sha256(f"{self._tok.to_str()}|eos={self.eos_id}".encode()).hexdigest()

    def save(self, folder: str | Path) -> Path:
        """Write ``tokenizer.json`` and the marker (with ``eos_id``) so that ``load_tokenizer(folder)`` reloads it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / "tokenizer.json", self._tok.to_str().encode())
        atomic_write(folder / MARKER, json.dumps({"type": "hf", "eos_id": self.eos_id, "source": self.name}).encode())
        return folder


Tokenizer = ByteTokenizer | HFTokenizer


def load_tokenizer(spec: str | Path | Tokenizer | None = None) -> Tokenizer:
    """``None`` or ``"byte"``: a :class:`ByteTokenizer`; a path to a ``tokenizer.json`` or to a folder holding one
    (or anything ``transformers.AutoTokenizer`` loads offline, or a folder saved by ``Tokenizer.save``): an
    :class:`HFTokenizer`. A tokenizer object is returned as is. Raises :class:`DataError` when nothing loads."""
    if isinstance(spec, (ByteTokenizer, HFTokenizer)):
        return spec
    if spec is None or str(spec) == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"tokenizer {str(spec)!r} is neither 'byte' nor an existing path")
    folder = path if path.is_dir() else path.parent
    marker = _read_marker(folder / MARKER) if (folder / MARKER).is_file() else None
    if path.name == MARKER or path.is_dir():
        if marker and marker["type"] == "byte":
            return ByteTokenizer()
        path = folder
    from tokenizers import Tokenizer as RawTokenizer

    try:
        if path.is_file():
            raw = RawTokenizer.from_file(str(path))
        elif (path / "tokenizer.json").is_file():
            raw = RawTokenizer.from_file(str(path / "tokenizer.json"))
        else:
            from transformers import AutoTokenizer

            raw = AutoTokenizer.from_pretrained(str(path), local_files_only=True).backend_tokenizer
    except Exception as e:  # any failure to load is reported with the path
        raise DataError(f"cannot load a tokenizer from {path}: {type(e).__name__}: {e}") from e
    eos_id = marker["eos_id"] if marker and marker["type"] == "hf" else _find_eos(raw, folder)
    return HFTokenizer(raw, str(path.resolve()), eos_id)


def _read_marker(path: Path) -> dict[str, Any]:
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read tokenizer marker {path}: {e}") from e
    if not isinstance(marker, dict) or marker.get("type") not in ("byte", "hf"):
        raise DataError(f"{path}: 'type' must be 'byte' or 'hf'")
    return marker


def _find_eos(raw: Any, folder: Path) -> int | None:
    """The eos id named by ``folder/tokenizer_config.json``, else the first known eos token in the vocabulary."""
    names = list(EOS_CANDIDATES)
    config = folder / "tokenizer_config.json"
    if config.is_file():
        try:
            eos = json.loads(config.read_text()).get("eos_token")
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {config}: {e}") from e
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if isinstance(eos, str):
            names.insert(0, eos)
    for name in names:
        idx = raw.token_to_id(name)
        if idx is not None:
            return int(idx)
    return None


def _splits_at_line_starts(pre: dict[str, Any] | None) -> bool:
    """Whether a pre-tokenizer is byte-level without a prefix space (GPT-2 and Llama-3 style), possibly in a
    sequence: its pre-tokens never span the point before a lone space or newline between non-space characters."""
    if not pre:
        return False
    if pre.get("type") == "Sequence":
        return any(_splits_at_line_starts(p) for p in pre.get("pretokenizers", []))
    return pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space", True)


def _pieces(text: str, size: int) -> list[str]:
    """``text`` cut into pieces of about ``size`` characters, each cut just before a space or newline that has a
    non-space character on both sides (no cut where there is none)."""
    pieces, start = [], 0
    while len(text) - start > size:
        match = CUT.search(text, start + size)
        if match is None:
            break
        pieces.append(text[start : match.start()])
        start = match.start()
    pieces.append(text[start:])
    return pieces


# ------------------------------------------------------------------------------------------------------- sources


def expand_sources(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """The files to read: each named file, and the files with a supported suffix under each named directory
    (recursively, sorted, hidden files skipped). Raises ``FileNotFoundError`` or :class:`DataError`."""
    files: list[Path] = []
    for p in _source_list(paths):
        if not p.exists():
            raise FileNotFoundError(f"data source {p} does not exist")
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*")
                if f.is_file() and _suffix(f.name) and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )  # fmt: skip
            if not found:
                raise DataError(f"directory {p} holds no files ending in {', '.join(SUFFIXES)}")
            files.extend(found)
        elif _suffix(p.name):
            files.append(p)
        else:
            raise DataError(f"{p}: unsupported file type; expected one of {', '.join(SUFFIXES)} or a directory")
    return [f.resolve() for f in files]


def _source_list(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not items:
        raise DataError("no data sources given")
    return [Path(item).expanduser() for item in items]


def _suffix(name: str) -> str | None:
    lower = name.lower()
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if lower.endswith(s)), None)


def read_documents(name: str, data: bytes, errors: str = "strict", text_field: str = "text") -> Iterator[str]:
    """The documents in one source's bytes; ``name`` (a file name, or ``archive.zip:member``) picks the format
    and appears in every error. Empty documents are skipped; an empty source is an error."""
    suffix = _suffix(name)
    if not data:
        raise DataError(f"{name} is empty")
    if suffix in (".txt.gz", ".jsonl.gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{name}: not a valid gzip file ({e})") from e
        if not data:
            raise DataError(f"{name} is empty after decompression")
    if suffix == ".zip":
        yield from _zip_documents(name, data, errors, text_field)
        return
    text = _decode(name, data, errors)
    if suffix in (".txt", ".txt.gz"):
        if not text:
            raise DataError(f"{name} holds no text")
        yield text
        return
    count = 0
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise DataError(f"{name}, line {lineno}: not valid JSON ({e})") from e
        if not isinstance(record, dict) or text_field not in record:
            raise DataError(f"{name}, line {lineno}: no {text_field!r} field")
        if not isinstance(record[text_field], str):
            raise DataError(f"{name}, line {lineno}: {text_field!r} is {type(record[text_field]).__name__}, not str")
        count += 1
        if record[text_field]:
            yield record[text_field]
    if not count:
        raise DataError(f"{name} holds no JSON lines")


def _zip_documents(name: str, data: bytes, errors: str, text_field: str) -> Iterator[str]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as e:
        raise DataError(f"{name}: not a valid zip file ({e})") from e
    with archive:
        members = sorted(
            m.filename for m in archive.infolist()
            if not m.is_dir() and _suffix(m.filename) not in (None, ".zip") and not m.filename.startswith("__MACOSX/")
        )  # fmt: skip
        if not members:
            raise DataError(f"{name} holds no files ending in {', '.join(s for s in SUFFIXES if s != '.zip')}")
        for member in members:
            yield from read_documents(f"{name}:{member}", archive.read(member), errors, text_field)


def _decode(name: str, data: bytes, errors: str) -> str:
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise DataError(
            f"{name}: invalid UTF-8 at byte offset {e.start} ({e.reason}); pass errors='replace' or 'ignore' to "
            "read it anyway"
        ) from e


# --------------------------------------------------------------------------------------------------------- corpus


@dataclass
class Corpus:
    """Token ids of a corpus split into train and validation (1-D arrays, memory-mapped from the cache)."""

    train: np.ndarray
    val: np.ndarray
    num_bytes_train: int
    num_bytes_val: int
    tokenizer: Tokenizer
    path: Path
    manifest: dict[str, Any] = field(repr=False)
    built: bool = False  # True when this call tokenized the sources, False when the cache was reused


def token_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """``uint16`` when every id fits, else ``uint32``."""
    return np.uint16 if vocab_size <= 65536 else np.uint32


def load_corpus(
    paths: str | Path | Sequence[str | Path],
    tokenizer: str | Path | Tokenizer | None = None,
    cache_dir: str | Path | None = None,
    val_fraction: float = 0.05,
    seed: int = 0,
    errors: str = "strict",
    text_field: str = "text",
    progress: bool = True,
) -> Corpus:
    """Tokenize ``paths`` (files or directories, see the module docstring), or reuse their cache.

    Documents are joined with ``eos`` between them. With two or more documents, ``max(1, round(val_fraction *
    n))`` of them (at least one left for training), chosen by a permutation seeded with ``seed``, form the
    validation split; a single document is cut at the first line start after ``1 - val_fraction`` of its
    characters and the tail is the validation split. ``errors`` (``strict``, ``replace``, ``ignore``) handles
    invalid UTF-8. The cache lives in ``cache_dir`` (default ``$BMOJO_CACHE`` or ``~/.cache/bmojo``) under
    ``data/<name>-<key>``, the key hashing the named sources, tokenizer and split settings, so a source that
    changes (or a directory that gains a file) rebuilds the same entry.
    """
    if errors not in ERRORS:
        raise DataError(f"errors must be one of {ERRORS}, got {errors!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    tok = load_tokenizer(tokenizer)
    files = expand_sources(paths)
    settings = {
        "version": CACHE_VERSION, "tokenizer_fingerprint": tok.fingerprint(),
        "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "dtype": np.dtype(token_dtype(tok.vocab_size)).name,
        "val_fraction": val_fraction, "seed": seed, "errors": errors, "text_field": text_field,
    }  # fmt: skip
    named = [str(p.resolve()) for p in _source_list(paths)]
    key = hashlib.sha256(json.dumps({"sources": named, **settings}, sort_keys=True).encode()).hexdigest()
    root = Path(cache_dir) if cache_dir is not None else Path(os.environ.get("BMOJO_CACHE", "~/.cache/bmojo"))
    folder = root.expanduser() / "data" / f"{Path(named[0]).name.split('.')[0]}-{key[:16]}"
    sources = [{"path": str(f), "size": f.stat().st_size, "sha256": sha256_file(f)} for f in files]
    manifest = _valid_manifest(folder, settings, sources)
    built = manifest is None
    if manifest is None:
        manifest = _build(folder, files, tok, settings, sources, text_field, progress)
    dtype = np.dtype(manifest["dtype"])
    return Corpus(
        train=_memmap(folder / "train.bin", dtype, manifest["train"]["tokens"]),
        val=_memmap(folder / "val.bin", dtype, manifest["val"]["tokens"]),
        num_bytes_train=manifest["train"]["bytes"],
        num_bytes_val=manifest["val"]["bytes"],
        tokenizer=tok,
        path=folder,
        manifest=manifest,
        built=built,
    )


def _valid_manifest(folder: Path, settings: dict[str, Any], sources: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The manifest in ``folder`` if it describes these sources and settings and its token files are complete."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("sources") != sources:
        return None
    if any(manifest.get(k) != v for k, v in settings.items()):
        return None
    itemsize = np.dtype(settings["dtype"]).itemsize
    for split in ("train", "val"):
        path = folder / f"{split}.bin"
        counts = manifest.get(split)
        if not isinstance(counts, dict) or not {"tokens", "bytes", "documents"} <= counts.keys():
            return None
        if not path.is_file() or path.stat().st_size != counts["tokens"] * itemsize:
            return None
    return manifest


def _memmap(path: Path, dtype: np.dtype, n: int) -> np.ndarray:
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype=dtype)


def split_documents(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of the validation documents among ``n_docs >= 2`` (see :func:`load_corpus`)."""
    if val_fraction == 0:
        return np.zeros(0, dtype=np.int64)
    n_val = min(max(1, round(val_fraction * n_docs)), n_docs - 1)
    return np.sort(np.random.default_rng(seed).permutation(n_docs)[:n_val])


def split_tail(text: str, val_fraction: float) -> tuple[str, str]:
    """``text`` cut into head and tail at the first line start at or after ``(1 - val_fraction) * len(text)``
    characters (at that character when no line starts later); the tail is empty when ``val_fraction`` is 0
    or the text is a single character."""
    if val_fraction == 0 or len(text) < 2:
        return text, ""
    cut = int(len(text) * (1 - val_fraction))
    line = text.find("\n", max(cut - 1, 0))
    if 0 <= line < len(text) - 1:
        cut = line + 1
    cut = min(max(cut, 1), len(text) - 1)
    return text[:cut], text[cut:]


def _build(
    folder: Path,
    files: list[Path],
    tok: Tokenizer,
    settings: dict[str, Any],
    sources: list[dict[str, Any]],
    text_field: str,
    progress: bool,
) -> dict[str, Any]:
    """Read every source, tokenize, and write the token files then the manifest (each atomically)."""
    docs: list[str] = []
    per_source = []
    for f in files:
        before = len(docs)
        docs.extend(read_documents(str(f), f.read_bytes(), settings["errors"], text_field))
        per_source.append(len(docs) - before)
    if not docs:
        raise DataError(f"no text in {', '.join(map(str, files))}")
    if len(docs) >= 2:
        val_idx = set(split_documents(len(docs), settings["val_fraction"], settings["seed"]).tolist())
        splits = {
            "train": [d for i, d in enumerate(docs) if i not in val_idx],
            "val": [d for i, d in enumerate(docs) if i in val_idx],
        }
    else:
        head, tail = split_tail(docs[0], settings["val_fraction"])
        splits = {"train": [head], "val": [tail] if tail else []}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").unlink(missing_ok=True)
    for stale in folder.glob("*.tmp"):
        stale.unlink(missing_ok=True)
    fsync_path(folder)
    manifest = {**settings, "tokenizer": tok.name, "sources": sources, "documents_per_source": per_source}
    dtype = np.dtype(settings["dtype"])
    total = sum(len(d) for d in docs)
    with _progress(progress, total, f"tokenizing {len(docs)} documents ({tok.name})") as advance:
        for split, split_docs in splits.items():
            tokens, nbytes = _write_tokens(folder / f"{split}.bin", split_docs, tok, dtype, advance)
            manifest[split] = {"documents": len(split_docs), "tokens": tokens, "bytes": nbytes}
    atomic_write(folder / "manifest.json", json.dumps(manifest, indent=1).encode())
    return manifest


def _write_tokens(path: Path, docs: list[str], tok: Tokenizer, dtype: np.dtype, advance: Any) -> tuple[int, int]:
    """Tokenize ``docs`` in batches, join them with eos, and write the ids atomically; (tokens, UTF-8 bytes)."""
    tokens = nbytes = 0
    eos = np.array([] if tok.eos_id is None else [tok.eos_id], dtype=dtype)
    with atomic_file(path) as f:
        for batch in _batches(docs, 4 * PIECE_CHARS * max(os.cpu_count() or 1, 1)):
            for j, ids in enumerate(tok.encode_batch(batch)):
                if tokens and len(eos):
                    f.write(eos.tobytes())
                    tokens += 1
                f.write(ids.astype(dtype, copy=False).tobytes())
                tokens += len(ids)
                nbytes += len(batch[j].encode("utf-8"))
            advance(sum(len(d) for d in batch))
    return tokens, nbytes


def _batches(docs: list[str], chars: int) -> Iterator[list[str]]:
    """Consecutive groups of documents of about ``chars`` characters in all."""
    batch: list[str] = []
    size = 0
    for d in docs:
        batch.append(d)
        size += len(d)
        if size >= chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class _progress:
    """A rich progress bar over characters, or nothing when ``enabled`` is false; yields an ``advance(n)``."""

    def __init__(self, enabled: bool, total: int, description: str) -> None:
        self.enabled, self.total, self.description = enabled, total, description

    def __enter__(self) -> Any:
        if not self.enabled:
            return lambda n: None
        from rich.progress import Progress

        self._bar = Progress(transient=True)
        self._bar.__enter__()
        task = self._bar.add_task(self.description, total=self.total)
        return lambda n: self._bar.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._bar.__exit__(*exc)
