"""WordPiece tokenisation, packing and the masking collator of tokdrop.data."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tokdrop.corpus import load_corpus
from tokdrop.data import (
    SPECIAL_TOKENS,
    MaskingCollator,
    load_tokenizer,
    num_mlm_predictions,
    pack_sequences,
    train_tokenizer,
)
from tokdrop.model import IGNORE_INDEX
from tokdrop.vocabulary import special_tokens

PAD, UNK, CLS, SEP, MASK = range(5)
VOCAB = 1000


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(sources=("pydoc_topics", "docstrings"))


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_tokenizer(corpus.train, vocab_size=2000)


def make_collator(**overrides) -> MaskingCollator:
    kwargs = dict(vocab_size=VOCAB, pad_token_id=PAD, mask_token_id=MASK, special_token_ids=(UNK, CLS, SEP))
    return MaskingCollator(**(kwargs | overrides))


def packed_rows(n_rows: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """Rows [CLS] w ... w [SEP] of random non-special ids, like pack_sequences' output."""
    rows = torch.randint(5, VOCAB, (n_rows, seq_len), generator=torch.Generator().manual_seed(seed))
    rows[:, 0], rows[:, -1] = CLS, SEP
    return rows


# ------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_has_bert_special_tokens_first(tokenizer):
    assert [tokenizer.id_to_token(i) for i in range(5)] == list(SPECIAL_TOKENS)
    assert special_tokens(tokenizer).as_tuple() == (PAD, UNK, CLS, SEP, MASK)
    assert tokenizer.get_vocab_size() == 2000


# Trains on the lines of a text file and saves the tokenizer, in a process of its own.
_TRAIN_TOKENIZER = """
import sys
from tokdrop.data import train_tokenizer
lines = open(sys.argv[1], encoding="utf-8").read().splitlines()
train_tokenizer(lines, vocab_size=2000).save(sys.argv[2])
"""


def test_tokenizer_training_is_byte_identical_across_processes(tokenizer, corpus, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(corpus.train) + "\n", encoding="utf-8")
    outputs = [tmp_path / f"tokenizer-{seed}.json" for seed in (1, 2)]
    # Two fresh interpreters with different hash seeds (the Rust trainer's hash maps are seeded
    # per process anyway), run side by side.
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", _TRAIN_TOKENIZER, str(texts), str(output)],
            env=os.environ | {"PYTHONHASHSEED": str(seed)},
        )
        for seed, output in zip((1, 2), outputs, strict=True)
    ]
    assert [run.wait(timeout=600) for run in runs] == [0, 0]
    tokenizer.save(str(tmp_path / "in-process.json"))
    first = outputs[0].read_bytes()
    assert first == outputs[1].read_bytes() == (tmp_path / "in-process.json").read_bytes()
    assert len(first) > 10_000


def test_tokenizer_trains_the_same_from_a_one_shot_iterator(tokenizer, corpus):
    streamed = train_tokenizer((paragraph for paragraph in corpus.train), vocab_size=2000)
    assert streamed.to_str() == tokenizer.to_str()


def test_only_the_bert_special_tokens_are_special(tokenizer):
    assert sorted(tokenizer.get_added_tokens_decoder()) == [PAD, UNK, CLS, SEP, MASK]
    # Continuation pieces reserved before training are ordinary vocabulary: they tokenise and decode.
    encoding = tokenizer.encode("zzzz", add_special_tokens=False)
    assert encoding.tokens[0] == "z" and all(t.startswith("##") for t in encoding.tokens[1:])
    assert tokenizer.decode(encoding.ids) == "zzzz"


def test_tokenizer_round_trips_real_text(tokenizer, corpus):
    for paragraph in corpus.held_out[:50]:
        encoding = tokenizer.encode(paragraph)
        assert encoding.ids[0] == CLS and encoding.ids[-1] == SEP
        assert UNK not in encoding.ids
        normalised = tokenizer.normalizer.normalize_str(paragraph)
        decoded = tokenizer.decode(encoding.ids)
        # WordPiece decoding re-spaces punctuation; the characters themselves must all come back.
        assert decoded.replace(" ", "") == normalised.replace(" ", "")


def test_tokenizer_is_uncased_and_marks_the_second_segment(tokenizer):
    pair = tokenizer.encode("Return the value.", "RETURN THE VALUE.")
    first_sep = pair.ids.index(SEP)
    assert pair.ids[1:first_sep] == pair.ids[first_sep + 1 : -1]
    assert pair.type_ids == [0] * (first_sep + 1) + [1] * (len(pair.ids) - first_sep - 1)


def test_tokenizer_loads_from_tokenizer_json_and_vocab_txt(tokenizer, tmp_path):
    text = "The built-in function returns an iterator over the arguments."
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    (tmp_path / "vocab_dir").mkdir()
    (tmp_path / "vocab_dir" / "vocab.txt").write_text("".join(f"{token}\n" for token, _ in vocab))
    for path in (tmp_path / "tokenizer.json", tmp_path, tmp_path / "vocab_dir"):
        assert load_tokenizer(path).encode(text).ids == tokenizer.encode(text).ids


def test_load_tokenizer_rejects_missing_files_and_vocabularies_without_special_tokens(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere.json")
    (tmp_path / "vocab.txt").write_text("[UNK]\nhello\nworld\n")
    with pytest.raises(ValueError, match=r"\[PAD\]"):
        load_tokenizer(tmp_path / "vocab.txt")


@pytest.mark.parametrize("vocab_size", [5, 0, 100.0])
def test_train_tokenizer_rejects_a_vocabulary_too_small_for_the_special_tokens(vocab_size):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["some text"], vocab_size=vocab_size)


def test_train_tokenizer_rejects_a_single_string():
    with pytest.raises(TypeError, match="not one string"):
        train_tokenizer("a text, where a list of texts was meant")


# --------------------------------------------------------------------------------------------- packing


def test_pack_sequences_cuts_the_token_stream_into_cls_sep_rows(tokenizer, corpus):
    texts = corpus.held_out[:40]
    stream = [i for text in texts for i in tokenizer.encode(text, add_special_tokens=False).ids]
    rows = pack_sequences(tokenizer, texts, seq_len=64)
    assert rows.dtype == torch.long and rows.shape == (len(stream) // 62, 64)
    assert (rows[:, 0] == CLS).all() and (rows[:, -1] == SEP).all()
    assert rows[:, 1:-1].flatten().tolist() == stream[: rows.shape[0] * 62]  # in order, ragged tail dropped
    assert not (rows == PAD).any()


def test_pack_sequences_rejects_short_rows_and_too_little_text(tokenizer):
    with pytest.raises(ValueError, match="seq_len"):
        pack_sequences(tokenizer, ["enough text here"], seq_len=2)
    with pytest.raises(ValueError, match="too few for one row of seq_len=512"):
        pack_sequences(tokenizer, ["a short text"], seq_len=512)


# --------------------------------------------------------------------------------------------- masking


def test_every_full_row_gets_exactly_p_predictions():
    batch = make_collator()(packed_rows(64, 128))
    assert ((batch["labels"] != IGNORE_INDEX).sum(dim=1) == num_mlm_predictions(128)).all()
    assert num_mlm_predictions(128) == 19 and num_mlm_predictions(512) == 77


def test_predictions_per_seq_overrides_p_and_short_rows_are_capped():
    rows = packed_rows(4, 32)
    rows[2, 6:] = PAD
    rows[2, 5] = SEP  # row 2 holds [CLS] + 4 tokens + [SEP], then padding
    batch = make_collator(predictions_per_seq=7)(rows)
    assert (batch["labels"] != IGNORE_INDEX).sum(dim=1).tolist() == [7, 7, 4, 7]


def test_masking_replaces_80_10_10_percent_of_predictions():
    rows = packed_rows(2000, 64)
    batch = make_collator(seed=3)(rows)
    predicted = batch["labels"] != IGNORE_INDEX
    n = int(predicted.sum())
    inputs = batch["input_ids"][predicted]
    masked = (inputs == MASK).sum() / n
    unchanged = (inputs == rows[predicted]).sum() / n
    randomised = 1 - masked - unchanged
    # n = 20000 predictions: one standard deviation of a 10% share is 0.2%.
    assert abs(masked - 0.8) < 0.015 and abs(randomised - 0.1) < 0.015 and abs(unchanged - 0.1) < 0.015


def test_predicted_positions_are_uniform_over_the_maskable_ones():
    batch = make_collator()(packed_rows(4000, 20))  # P = 3 of 18 maskable positions
    per_position = (batch["labels"] != IGNORE_INDEX).sum(dim=0).float()
    assert per_position[0] == 0 and per_position[-1] == 0
    expected = 4000 * 3 / 18
    assert ((per_position[1:-1] - expected).abs() < 0.12 * expected).all()


@given(
    lengths=st.lists(st.integers(min_value=3, max_value=40), min_size=1, max_size=8),
    p=st.one_of(st.none(), st.integers(min_value=1, max_value=50)),
    special_rate=st.floats(min_value=0.0, max_value=0.5),
    seed=st.integers(min_value=0, max_value=2**31),
)
def test_collator_invariants_under_padding_and_special_tokens(lengths, p, special_rate, seed):
    seq_len = max(lengths)
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(5, VOCAB, (len(lengths), seq_len), generator=g)
    # Special tokens inside the text ([UNK], [MASK], [SEP]) are never predicted either.
    inner_special = torch.rand(rows.shape, generator=g) < special_rate
    rows[inner_special] = torch.tensor([UNK, MASK, SEP])[torch.randint(3, (int(inner_special.sum()),), generator=g)]
    for row, length in enumerate(lengths):
        rows[row, 0], rows[row, length - 1], rows[row, length:] = CLS, SEP, PAD
    collator = make_collator(predictions_per_seq=p)
    batch = collator(rows, generator=g)
    labels, inputs = batch["labels"], batch["input_ids"]
    predicted = labels != IGNORE_INDEX
    maskable = rows >= 5

    assert all(t.shape == rows.shape and t.dtype == torch.long for t in batch.values())
    assert not (predicted & ~maskable).any()  # specials and padding never predicted
    assert torch.equal(inputs[~predicted], rows[~predicted])  # and never changed
    assert torch.equal(labels[predicted], rows[predicted])  # labels hold the original ids
    expected = torch.clamp(maskable.sum(dim=1), max=collator.num_predictions(seq_len))
    assert torch.equal(predicted.sum(dim=1), expected)
    changed = predicted & (inputs != rows)
    assert ((inputs[changed] == MASK) | (inputs[changed] >= 5)).all()  # random ids are never special
    assert torch.equal(batch["attention_mask"], (rows != PAD).long())
    assert not batch["token_type_ids"].any()


def test_masking_is_deterministic_for_a_seed_or_generator():
    rows = packed_rows(8, 64)
    first, again = make_collator(seed=7)(rows), make_collator(seed=7)(rows)
    other = make_collator(seed=8)(rows)
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(first["labels"], other["labels"])
    from_generator = make_collator(seed=99)(rows, generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(first[key], from_generator[key]) for key in first)


def test_collator_works_as_a_dataloader_collate_fn(tokenizer, corpus):
    rows = pack_sequences(tokenizer, corpus.held_out[:60], seq_len=32)
    collator = MaskingCollator.from_tokenizer(tokenizer)
    loader = torch.utils.data.DataLoader(list(rows), batch_size=4, collate_fn=collator)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (4, 32)
    assert ((batch["labels"] != IGNORE_INDEX).sum(dim=1) == 5).all()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mlm_probability": 1.5}, "mlm_probability must be a probability in \\(0, 1\\], got 1.5"),
        ({"mlm_probability": 0.0}, "mlm_probability"),
        ({"mask_replace_prob": -0.1}, "mask_replace_prob must be a probability in \\[0, 1\\], got -0.1"),
        ({"random_replace_prob": 1.01}, "random_replace_prob"),
        ({"mask_replace_prob": 0.8, "random_replace_prob": 0.3}, "<= 1, got 0.8 \\+ 0.3"),
        ({"predictions_per_seq": 0}, "predictions_per_seq must be an int >= 1 or None, got 0"),
        ({"vocab_size": 5}, "vocab_size must be an int > 5 \\(the special ids\\), got 5"),
        ({"mask_token_id": 1000}, "special token ids \\[1000\\] are outside the vocabulary"),
    ],
)
def test_collator_rejects_bad_settings(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_collator(**overrides)


@pytest.mark.parametrize(
    ("batch", "error", "message"),
    [
        (torch.tensor([[CLS, SEP]]), ValueError, "seq_len must be >= 3"),
        (torch.tensor([CLS, 7, SEP]), ValueError, "shape \\[batch >= 1, seq_len\\], got \\(3,\\)"),
        (torch.tensor([[CLS, 7, 1000, SEP]]), ValueError, "token id 1000 is outside the vocabulary"),
        (torch.tensor([[CLS, -3, 7, SEP]]), ValueError, "token id -3 is outside the vocabulary"),
        (torch.tensor([[2.0, 7.0, 3.0]]), TypeError, "integer tensor, got dtype torch.float32"),
        ([[CLS, 7, SEP], [CLS, 7, 8, SEP]], ValueError, "equal length, got lengths \\[3, 4\\]"),
    ],
)
def test_collator_rejects_bad_batches(batch, error, message):
    with pytest.raises(error, match=message):
        make_collator()(batch)


def test_a_checkpoint_tokenizer_loads_without_padding_or_truncation(minilm_dir):
    """all-MiniLM-L6-v2's tokenizer.json pads and truncates for serving; tokenising a corpus must not."""
    from tokdrop.data import load_tokenizer

    tokenizer = load_tokenizer(minilm_dir)
    long, short = "word " * 600, "a b"
    encodings = tokenizer.encode_batch([long, short], add_special_tokens=False)
    assert len(encodings[0].ids) == 600 and len(encodings[1].ids) == 2
