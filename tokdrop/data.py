"""Pretraining data: WordPiece tokenisation, packing into rows, masked-LM masking.

The text itself comes from `tokdrop.corpus`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from torch import Tensor

from tokdrop.model import IGNORE_INDEX  # label value of positions without a prediction
from tokdrop.vocabulary import special_tokens

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
CONTINUATION_PREFIX = "##"


# ------------------------------------------------------------------------------------------ tokenizer


def _set_bert_pipeline(tokenizer: Tokenizer) -> None:
    """Uncased BERT normalisation and pre-tokenisation, WordPiece decoding."""
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=None)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix=CONTINUATION_PREFIX)


def _set_bert_template(tokenizer: Tokenizer) -> None:
    """BERT post-processing: [CLS] A [SEP], and [CLS] A [SEP] B [SEP] with B as segment 1."""
    ids = special_tokens(tokenizer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids.cls), ("[SEP]", ids.sep)],
    )


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192) -> Tokenizer:
    """Train an uncased BERT-style WordPiece tokenizer; [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4.

    Deterministic: the same texts give a byte-identical ``tokenizer.json`` in every process.
    tokenizers' trainer numbers the continuation pieces ("##e") in hash-map order as it meets them
    and breaks ties between equally frequent merges by those numbers (tokenizers issue #1794), so
    a piece for every character that can continue a word is put into the vocabulary, in sorted
    order, before training starts. ``texts`` is read once, into a temporary file: the characters
    must be known before training, and nothing holds the text in memory.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of strings, not one string")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be an int > {len(SPECIAL_TOKENS)}, got {vocab_size!r}")
    pipeline = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    _set_bert_pipeline(pipeline)
    with tempfile.TemporaryDirectory(prefix="tokdrop-tokenizer-") as scratch:
        text_file = Path(scratch) / "texts.txt"
        characters: set[str] = set()
        with text_file.open("w", encoding="utf-8") as out:
            for text in texts:
                characters.update(text)
                out.write(text + "\n")
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            special_tokens=[*SPECIAL_TOKENS, *_continuation_pieces(pipeline, characters)],
            continuing_subword_prefix=CONTINUATION_PREFIX,
            show_progress=False,
        )
        pipeline.train([str(text_file)], trainer=trainer)
    # A fresh tokenizer over the trained vocabulary, so that only SPECIAL_TOKENS are special
    # tokens; the reserved continuation pieces become ordinary entries of the vocabulary.
    tokenizer = Tokenizer(models.WordPiece(pipeline.get_vocab(with_added_tokens=False), unk_token="[UNK]"))
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    _set_bert_pipeline(tokenizer)
    _set_bert_template(tokenizer)
    return tokenizer


def _continuation_pieces(pipeline: Tokenizer, characters: Iterable[str]) -> list[str]:
    """The pieces "##c", sorted, for each character c that normalising ``characters`` gives and that
    the pre-tokenizer leaves inside a word."""
    # BertNormalizer maps each character on its own (no context), so normalising the distinct
    # characters gives exactly the characters of the normalised text.
    normalized = {c for raw in characters for c in pipeline.normalizer.normalize_str(raw)}
    return [
        CONTINUATION_PREFIX + c
        for c in sorted(normalized)
        if [piece for piece, _ in pipeline.pre_tokenizer.pre_tokenize_str("a" + c)] == ["a" + c]
    ]


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Load a WordPiece tokenizer from a ``tokenizer.json`` or a BERT ``vocab.txt`` (uncased), with
    padding and truncation off whatever the file says (a checkpoint's tokenizer.json often pads and
    truncates to its serving length, which would put padding into a token stream and cut text).

    A directory is searched for ``tokenizer.json`` first, then ``vocab.txt``.
    """
    path = Path(path)
    if path.is_dir():
        candidates = [path / "tokenizer.json", path / "vocab.txt"]
        path = next((c for c in candidates if c.is_file()), candidates[0])
    if not path.is_file():
        raise ValueError(f"tokenizer file {str(path)!r} does not exist")
    try:
        if path.suffix == ".json":
            tokenizer = Tokenizer.from_file(str(path))
            special_tokens(tokenizer)
        else:
            tokenizer = Tokenizer(models.WordPiece.from_file(str(path), unk_token="[UNK]"))
            _set_bert_pipeline(tokenizer)
            _set_bert_template(tokenizer)
    except ValueError as err:
        raise ValueError(f"tokenizer {str(path)!r}: {err}") from None
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


# -------------------------------------------------------------------------------------------- packing


def pack_sequences(tokenizer: Tokenizer, texts: Iterable[str], seq_len: int) -> Tensor:
    """Tokenise ``texts``, concatenate them and cut the stream into rows ``[CLS] ... [SEP]``.

    Returns a LongTensor [N, seq_len] without padding: every row holds ``seq_len - 2`` text tokens,
    and the ragged tail of the stream (fewer than ``seq_len - 2`` tokens) is dropped.
    """
    if not isinstance(seq_len, int) or seq_len < 3:
        raise ValueError(f"seq_len must be an int >= 3 ([CLS], a token, [SEP]), got {seq_len!r}")
    ids = special_tokens(tokenizer)
    stream = [i for enc in tokenizer.encode_batch(list(texts), add_special_tokens=False) for i in enc.ids]
    body = seq_len - 2
    n_rows = len(stream) // body
    if n_rows == 0:
        raise ValueError(f"the texts hold {len(stream)} tokens, too few for one row of seq_len={seq_len}")
    rows = torch.tensor(stream[: n_rows * body], dtype=torch.long).view(n_rows, body)
    cls = torch.full((n_rows, 1), ids.cls, dtype=torch.long)
    sep = torch.full((n_rows, 1), ids.sep, dtype=torch.long)
    return torch.cat([cls, rows, sep], dim=1)


# -------------------------------------------------------------------------------------------- masking


def num_mlm_predictions(seq_len: int, mlm_probability: float = 0.15) -> int:
    """BERT's fixed number of masked-LM predictions per row: round(mlm_probability * seq_len), >= 1."""
    _check_probability("mlm_probability", mlm_probability, allow_zero=False)
    return max(1, round(mlm_probability * seq_len))


def _check_probability(name: str, value: float, allow_zero: bool = True) -> None:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or not (0.0 <= value <= 1.0) or (value == 0.0 and not allow_zero):
        bounds = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must be a probability in {bounds}, got {value!r}")


class MaskingCollator:
    """BERT masked-LM masking with a fixed number of predictions per row, so shapes stay static.

    Each row gets exactly ``P = predictions_per_seq`` predicted positions (default
    ``round(mlm_probability * seq_len)``), or all of its maskable tokens when it has fewer. Maskable
    means not padding and not a special token. Of the predicted positions, ``mask_replace_prob`` (80%)
    become [MASK], ``random_replace_prob`` (10%) a random non-special token, the rest stay unchanged.

    Call it on a LongTensor [B, S] or on a sequence of equal-length rows (as a DataLoader
    ``collate_fn``). It returns ``input_ids``, ``attention_mask``, ``token_type_ids`` and ``labels``,
    all [B, S] int64; ``labels`` holds the original id at predicted positions and ``IGNORE_INDEX``
    elsewhere. Draws come from ``generator`` when given, else from the collator's own generator
    seeded with ``seed``: the same seed and inputs give the same batches.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        pad_token_id: int,
        mask_token_id: int,
        special_token_ids: Iterable[int],
        mlm_probability: float = 0.15,
        predictions_per_seq: int | None = None,
        mask_replace_prob: float = 0.8,
        random_replace_prob: float = 0.1,
        seed: int = 0,
    ) -> None:
        _check_probability("mlm_probability", mlm_probability, allow_zero=False)
        _check_probability("mask_replace_prob", mask_replace_prob)
        _check_probability("random_replace_prob", random_replace_prob)
        if mask_replace_prob + random_replace_prob > 1.0:
            raise ValueError(
                f"mask_replace_prob + random_replace_prob must be <= 1, got "
                f"{mask_replace_prob!r} + {random_replace_prob!r}"
            )
        if predictions_per_seq is not None and (not isinstance(predictions_per_seq, int) or predictions_per_seq < 1):
            raise ValueError(f"predictions_per_seq must be an int >= 1 or None, got {predictions_per_seq!r}")
        specials = sorted({pad_token_id, mask_token_id, *special_token_ids})
        if not isinstance(vocab_size, int) or vocab_size <= len(specials):
            raise ValueError(f"vocab_size must be an int > {len(specials)} (the special ids), got {vocab_size!r}")
        out_of_vocab = [i for i in specials if not 0 <= i < vocab_size]
        if out_of_vocab:
            raise ValueError(f"special token ids {out_of_vocab} are outside the vocabulary [0, {vocab_size})")
        self.vocab_size = vocab_size
        self.pad_token_id = pad_token_id
        self.mask_token_id = mask_token_id
        self.mlm_probability = mlm_probability
        self.predictions_per_seq = predictions_per_seq
        self.mask_replace_prob = mask_replace_prob
        self.random_replace_prob = random_replace_prob
        self.generator = torch.Generator().manual_seed(seed)
        self._special_ids = torch.tensor(specials, dtype=torch.long)
        is_special = torch.zeros(vocab_size, dtype=torch.bool)
        is_special[self._special_ids] = True
        self._random_pool = (~is_special).nonzero().squeeze(1)  # replacement ids: never a special token

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, **kwargs) -> MaskingCollator:
        ids = special_tokens(tokenizer)
        return cls(
            vocab_size=tokenizer.get_vocab_size(),
            pad_token_id=ids.pad,
            mask_token_id=ids.mask,
            special_token_ids=ids.as_tuple(),
            **kwargs,
        )

    def num_predictions(self, seq_len: int) -> int:
        """P for rows of ``seq_len`` tokens: the static number of prediction slots per row."""
        return self.predictions_per_seq or num_mlm_predictions(seq_len, self.mlm_probability)

    def __call__(self, batch: Tensor | Sequence, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        ids = self._as_id_batch(batch)
        g = self.generator if generator is None else generator
        n_rows, seq_len = ids.shape
        maskable = ~torch.isin(ids, self._special_ids)
        n_slots = min(self.num_predictions(seq_len), seq_len)

        # Random keys with non-maskable positions sorted last: the first P columns of the order are a
        # uniform sample of the maskable positions, of which each row takes min(P, its maskable count).
        keys = torch.rand(n_rows, seq_len, generator=g).masked_fill_(~maskable, 2.0)
        slots = keys.argsort(dim=1)[:, :n_slots]
        taken = torch.arange(n_slots) < maskable.sum(dim=1, keepdim=True)
        predicted = torch.zeros_like(maskable)
        predicted[torch.arange(n_rows).unsqueeze(1).expand_as(slots)[taken], slots[taken]] = True

        choice = torch.rand(n_rows, seq_len, generator=g)
        to_mask = predicted & (choice < self.mask_replace_prob)
        to_random = predicted & ~to_mask & (choice < self.mask_replace_prob + self.random_replace_prob)
        random_ids = self._random_pool[torch.randint(len(self._random_pool), (n_rows, seq_len), generator=g)]
        input_ids = torch.where(to_random, random_ids, ids).masked_fill_(to_mask, self.mask_token_id)
        return {
            "input_ids": input_ids,
            "attention_mask": (ids != self.pad_token_id).long(),
            "token_type_ids": torch.zeros_like(ids),
            "labels": torch.where(predicted, ids, IGNORE_INDEX),
        }

    def _as_id_batch(self, batch: Tensor | Sequence) -> Tensor:
        if not isinstance(batch, Tensor):
            rows = [torch.as_tensor(row) for row in batch]
            lengths = sorted({row.numel() for row in rows})
            if len(lengths) > 1:
                raise ValueError(f"rows of a batch must have equal length, got lengths {lengths}")
            batch = torch.stack(rows) if rows else torch.empty(0, 0, dtype=torch.long)
        if batch.dtype.is_floating_point or batch.dtype.is_complex or batch.dtype == torch.bool:
            raise TypeError(f"token ids must be an integer tensor, got dtype {batch.dtype}")
        if batch.dim() != 2 or batch.shape[0] == 0:
            raise ValueError(f"token ids must have shape [batch >= 1, seq_len], got {tuple(batch.shape)}")
        if batch.shape[1] < 3:
            raise ValueError(f"seq_len must be >= 3 ([CLS], a token, [SEP]), got {batch.shape[1]}")
        low, high = int(batch.min()), int(batch.max())
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        return batch.long()
