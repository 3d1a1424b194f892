"""Token shards: a text corpus tokenised once into memory-mapped files (`tokdrop.pretrain.stream`
reads them back as training rows).

A shard directory holds

    shards.json       what the directory holds (with the SHA-256 of all token ids, so that a
                      resumed run notices a rebuilt directory); written last, so a directory
                      without it is incomplete
    tokenizer.json    the tokenizer that made it
    tokens-00000.bin  token ids back to back: uint16 when the vocabulary fits, else uint32

Nothing holds the corpus in memory: text is read in chunks of 1 MiB, a line longer than 64 Ki
characters is cut at white space (which the tokenizer splits at anyway), and the tokens are appended
to the current shard as they come.

Text files that are empty (nothing but white space) or not valid UTF-8 are skipped with a warning
and listed, with the reason, under "skipped" in shards.json; no usable file at all is an error.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import secrets
import shutil
import warnings
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from tokdrop.data import load_tokenizer, train_tokenizer
from tokdrop.pretrain.disk import free_space
from tokdrop.pretrain.distributed import on_rank_zero
from tokdrop.pretrain.locks import shard_directory_lock
from tokdrop.pretrain.settings import Settings, path_problem
from tokdrop.vocabulary import special_tokens

MANIFEST = "shards.json"
FORMAT = "tokdrop-token-shards-2"
TOKENIZER = "tokenizer.json"
SHARD_TOKENS = 1 << 27  # ids per shard file (256 MiB as uint16)
_TEXT_BATCH_CHARS = 1 << 20  # text handed to the tokenizer at once (it encodes a batch in parallel)
_READ_BYTES = 1 << 20
_PIECE_CHARS = 1 << 16  # the longest text the tokenizer gets as one piece; its memory grows with that
_UP_TO_LAST_SPACE = re.compile(r".*\s", re.DOTALL)


# ---------------------------------------------------------------------------------------- text input


def text_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The files named by `paths`; a directory stands for every file below it (sorted, hidden
    files and folders left out)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            below = (p for p in sorted(path.rglob("*")) if p.is_file())
            files += [p for p in below if not any(part.startswith(".") for part in p.relative_to(path).parts)]
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"data path {str(path)!r} {path_problem(path, 'a text file or a directory of them')}")
    if not files:
        raise ValueError(f"the data paths {[str(p) for p in paths]} hold no files")
    return files


def unusable_reason(path: Path) -> str | None:
    """Why `path` cannot be used as text ("empty", "not UTF-8 ..."), or None; reads it in chunks."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    has_text, offset = False, 0
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            try:
                has_text = bool(decoder.decode(chunk).strip()) or has_text
            except UnicodeDecodeError as err:
                return f"not UTF-8 (invalid byte near offset {offset + err.start})"
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return "not UTF-8 (truncated character at the end)"
    return None if has_text else "empty"


def _text_pieces(path: Path, progress: tqdm) -> Iterator[str]:
    """The non-blank lines of `path`, stripped, a line longer than `_PIECE_CHARS` in pieces cut at
    white space; reads `_READ_BYTES` at a time, whatever the line lengths, and counts them on `progress`."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    pending = ""
    with open(path, "rb") as file:
        while chunk := file.read(_READ_BYTES):
            progress.update(len(chunk))
            *lines, pending = (pending + decoder.decode(chunk)).split("\n")
            for line in lines:
                yield from _pieces(line)
            while len(pending) > _PIECE_CHARS:  # a line that goes on past this chunk
                piece, pending = _cut(pending)
                yield from _pieces(piece)
    yield from _pieces(pending + decoder.decode(b"", final=True))


def _cut(text: str) -> tuple[str, str]:
    """`text` split after its last white space within `_PIECE_CHARS` characters (or at that length,
    when there is none)."""
    found = _UP_TO_LAST_SPACE.match(text, 0, _PIECE_CHARS)
    end = found.end() if found else _PIECE_CHARS
    return text[:end], text[end:]


def _pieces(line: str) -> Iterator[str]:
    while len(line) > _PIECE_CHARS:
        piece, line = _cut(line)
        if piece := piece.strip():
            yield piece
    if line := line.strip():
        yield line


def _line_batches(files: Sequence[Path], progress: tqdm) -> Iterator[list[str]]:
    """The text pieces of `files`, about `_TEXT_BATCH_CHARS` at a time; counts bytes on `progress`."""
    batch, size = [], 0
    for path in files:
        for piece in _text_pieces(path, progress):
            batch.append(piece)
            size += len(piece)
            if size >= _TEXT_BATCH_CHARS:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def _byte_progress(files: Sequence[Path], what: str) -> tqdm:
    total = sum(path.stat().st_size for path in files)
    return tqdm(total=total, desc=what, unit="B", unit_scale=True, dynamic_ncols=True)


def sources_of(files: Sequence[Path], tokenizer: str | os.PathLike | None, vocab_size: int) -> dict:
    """What a shard directory is built from: the files as they are now and the tokenizer."""
    described = [{"path": str(p.resolve()), "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in files]
    made_by = str(Path(tokenizer).resolve()) if tokenizer is not None else f"trained, vocab_size={vocab_size}"
    return {"files": described, "tokenizer": made_by}


def build_shards(
    files: Sequence[Path],
    directory: Path,
    *,
    tokenizer: Tokenizer | None,
    vocab_size: int,
    sources: dict,
    shard_tokens: int = SHARD_TOKENS,
) -> ShardSet:
    """Tokenise `files` into a new shard directory (training a WordPiece tokenizer of `vocab_size`
    on them first when `tokenizer` is None). Built under a temporary name and renamed when done."""
    if directory.exists():
        raise ValueError(f"shard directory {directory} already exists")
    usable, skipped = [], []
    for path in files:
        reason = unusable_reason(path)
        if reason is None:
            usable.append(path)
        else:
            warnings.warn(f"skipping data file {path}: {reason}", stacklevel=2)
            skipped.append({"path": str(path), "reason": reason})
    if not usable:
        raise ValueError(f"none of the {len(files)} data files is usable text: {skipped[:5]}")
    if tokenizer is None:
        with _byte_progress(usable, "training tokenizer") as progress:
            tokenizer = train_tokenizer(chain.from_iterable(_line_batches(usable, progress)), vocab_size)
    special_tokens(tokenizer)  # a tokenizer without [CLS], [SEP], [MASK]... cannot pack rows
    dtype = np.dtype(np.uint16 if tokenizer.get_vocab_size() <= 1 << 16 else np.uint32)

    temp = directory.with_name(f".{directory.name}.{secrets.token_hex(4)}.tmp")
    temp.mkdir(parents=True)
    try:
        counts, tokens_sha256 = _write_token_files(usable, temp, tokenizer, dtype, shard_tokens)
        if sum(counts) == 0:
            raise ValueError(f"the data files {[str(p) for p in usable[:5]]} hold no tokens")
        tokenizer.save(str(temp / TOKENIZER))
        manifest = {
            "format": FORMAT,
            "dtype": dtype.name,
            "vocab_size": tokenizer.get_vocab_size(),
            "tokens": counts,
            "tokens_sha256": tokens_sha256,
            "sources": sources,
            "skipped": skipped,
        }
        (temp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(temp, directory)
    except OSError as err:  # numpy's failed write names neither the file nor the cause
        message = f"cannot write shard directory {directory}: {err} ({free_space(temp)})"
        shutil.rmtree(temp, ignore_errors=True)
        raise OSError(message) from err
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    if skipped:
        print(f"skipped {len(skipped)} of {len(files)} data files (listed in {directory / MANIFEST})")
    return ShardSet(directory)


def _write_token_files(
    files: Sequence[Path], directory: Path, tokenizer: Tokenizer, dtype: np.dtype, shard_tokens: int
) -> tuple[list[int], str]:
    """Tokenise `files` into token files in `directory`; returns the tokens per file and the
    SHA-256 of all of them."""
    counts: list[int] = []
    digest = hashlib.sha256()
    out = None
    try:
        with _byte_progress(files, "tokenising") as progress:
            for lines in _line_batches(files, progress):
                encodings = tokenizer.encode_batch(lines, add_special_tokens=False)
                ids = np.fromiter(chain.from_iterable(e.ids for e in encodings), dtype=dtype)
                while len(ids):
                    if out is None or counts[-1] >= shard_tokens:
                        if out is not None:
                            out.close()
                        out = open(directory / _shard_name(len(counts)), "wb")
                        counts.append(0)
                    part, ids = ids[: shard_tokens - counts[-1]], ids[shard_tokens - counts[-1] :]
                    part.tofile(out)
                    digest.update(part)
                    counts[-1] += len(part)
    finally:
        if out is not None:
            out.close()
    return counts, digest.hexdigest()


def _shard_name(index: int) -> str:
    return f"tokens-{index:05d}.bin"


# ------------------------------------------------------------------------------------------- reading


class ShardSet:
    """A shard directory opened for reading; its files are memory-mapped on first use (and again in
    each DataLoader worker, since maps are not pickled)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        path = self.directory / MANIFEST
        if not path.is_file():
            raise ValueError(f"{self.directory} is not a shard directory: {MANIFEST} is missing")
        try:
            manifest = json.loads(path.read_text())
            if manifest.get("format") != FORMAT:
                raise ValueError(
                    f"format is {manifest.get('format')!r}, expected {FORMAT!r}; remove the directory to rebuild it"
                )
            self.dtype = np.dtype(manifest["dtype"])
            self.counts = [int(n) for n in manifest["tokens"]]
            self.vocab_size = int(manifest["vocab_size"])
            self.tokens_sha256 = str(manifest["tokens_sha256"])
            self.skipped = manifest["skipped"]
            self.sources = manifest["sources"]
        except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
            raise ValueError(f"{path} is not a valid shard manifest: {err}") from err
        for index, count in enumerate(self.counts):
            file = self.directory / _shard_name(index)
            size = file.stat().st_size if file.is_file() else None
            if size != count * self.dtype.itemsize:
                raise ValueError(
                    f"shard file {file} holds {size} bytes, {MANIFEST} promises "
                    f"{count * self.dtype.itemsize} ({count} tokens of {self.dtype.name})"
                )
        self._maps: list[np.memmap] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None}

    @property
    def total_tokens(self) -> int:
        return sum(self.counts)

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.directory / TOKENIZER)

    def identity(self) -> dict:
        """What a resumed run must find again: the same token ids (by their count and their hash
        taken when they were written) and the same tokenizer (by the hash of its file)."""
        return {
            "tokens": self.counts,
            "dtype": self.dtype.name,
            "vocab_size": self.vocab_size,
            "tokens_sha256": self.tokens_sha256,
            "tokenizer_sha256": hashlib.sha256((self.directory / TOKENIZER).read_bytes()).hexdigest(),
        }

    def tokens(self, shard: int) -> np.memmap:
        if self._maps is None:
            self._maps = [
                np.memmap(self.directory / _shard_name(i), dtype=self.dtype, mode="r", shape=(count,))
                for i, count in enumerate(self.counts)
            ]
        return self._maps[shard]


def require_data(settings: Settings) -> None:
    """Refuse a run without --data, before it creates anything."""
    if not settings.data:
        raise ValueError(
            "no data: set --data (or `data` in the --config file) to text files, directories of them, "
            "or a shard directory"
        )


def prepare_shards(settings: Settings) -> ShardSet:
    """The shard directory of --data (see `require_data`), tokenising text on rank 0 the first time."""
    if len(settings.data) == 1 and (Path(settings.data[0]) / MANIFEST).is_file():
        return ShardSet(settings.data[0])
    directory = Path(settings.shard_dir or Path(settings.out) / "shards")

    def tokenise() -> None:
        with shard_directory_lock(directory):
            files = text_files(settings.data)
            tokenizer_path = Path(settings.tokenizer) if settings.tokenizer else None
            if tokenizer_path and not (tokenizer_path.is_file() or tokenizer_path.is_dir()):
                expected = "a tokenizer.json, a vocab.txt or a directory holding one"
                raise ValueError(f"tokenizer {settings.tokenizer!r} {path_problem(tokenizer_path, expected)}")
            sources = sources_of(files, settings.tokenizer, settings.vocab_size)
            if not directory.exists():
                tokenizer = load_tokenizer(settings.tokenizer) if settings.tokenizer else None
                build_shards(files, directory, tokenizer=tokenizer, vocab_size=settings.vocab_size, sources=sources)
            elif ShardSet(directory).sources != sources:
                raise ValueError(
                    f"shard directory {directory} was made from other files or another tokenizer; "
                    f"remove it or choose another --shard-dir"
                )

    on_rank_zero(tokenise)
    return ShardSet(directory)


__all__ = ["ShardSet", "prepare_shards", "require_data", "build_shards", "sources_of", "text_files", "unusable_reason"]
