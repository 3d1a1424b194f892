"""Selection, drop/restore and token importance: properties against slow references."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tokdrop import BertConfig
from tokdrop.layers import (
    BertLayer,
    NarrowEncoder,
    TokenDropEncoder,
    TokenImportance,
    drop_tokens,
    kept_counts,
    pack_positions,
    restore_tokens,
    select_tokens,
)


@st.composite
def batches(draw):
    """Scores and right-padded lengths with heavy ties and pinned (+inf / -inf) scores."""
    batch = draw(st.integers(1, 4))
    seq_len = draw(st.integers(1, 24))
    lengths = draw(st.lists(st.integers(1, seq_len), min_size=batch, max_size=batch))
    values = st.sampled_from([0.0, 1.0, 2.5, 2.5, 7.0, float("inf"), float("-inf")]) | st.floats(-5, 5)
    scores = draw(st.lists(st.lists(values, min_size=seq_len, max_size=seq_len), min_size=batch, max_size=batch))
    keep = draw(st.floats(0.01, 1.0) | st.integers(1, seq_len))
    return torch.tensor(scores), torch.tensor(lengths), keep


@given(batches())
def test_selection_invariants(case):
    scores, lengths, keep = case
    index, counts = select_tokens(scores, lengths, keep)
    seq_len = scores.shape[1]
    assert index.shape[1] == (keep if isinstance(keep, int) else math.ceil(seq_len * keep - 1e-9))
    for row in range(scores.shape[0]):
        length, count = int(lengths[row]), int(counts[row])
        expected = min(keep, length) if isinstance(keep, int) else math.ceil(keep * length - 1e-9)
        assert count == expected
        positions = index[row].tolist()
        assert len(set(positions)) == len(positions), "index rows hold distinct positions"
        kept = positions[:count]
        assert kept == sorted(kept), "kept positions ascend"
        assert all(p < length for p in kept), "padding is never kept while real tokens remain"
        dropped = [p for p in range(length) if p not in kept]
        # Every kept token outranks every dropped one: higher score, or equal score and earlier.
        for k in kept:
            for d in dropped:
                sk, sd = scores[row, k].item(), scores[row, d].item()
                assert sk > sd or (sk == sd and k < d), (row, k, d, sk, sd)
        pinned = [p for p in range(length) if scores[row, p] == float("inf")]
        assert sum(p in kept for p in pinned) == min(count, len(pinned)), "allow-listed kept while K allows"


@given(st.integers(1, 4), st.integers(1, 20), st.data())
def test_pack_positions_layout(batch, seq_len, data):
    mask = torch.tensor(
        data.draw(st.lists(st.lists(st.booleans(), min_size=seq_len, max_size=seq_len), min_size=batch, max_size=batch))
    )
    size = data.draw(st.integers(max(1, int(mask.sum(1).max())), seq_len))
    index, counts = pack_positions(mask, size)
    for row in range(batch):
        chosen = mask[row].nonzero().flatten().tolist()
        others = (~mask[row]).nonzero().flatten().tolist()
        assert index[row].tolist() == (chosen + others)[:size]
        assert int(counts[row]) == len(chosen)


@given(batches(), st.integers(1, 5))
def test_restore_of_drop_is_identity(case, hidden):
    scores, lengths, keep = case
    x = torch.randn(*scores.shape, hidden)
    index, counts = select_tokens(scores, lengths, keep)
    assert torch.equal(restore_tokens(x, drop_tokens(x, index), index, counts), x)


def test_restore_writes_kept_rows_only_and_its_gradient_is_exact():
    saved = torch.randn(2, 6, 3, requires_grad=True)
    index = torch.tensor([[1, 4, 0], [2, 3, 5]])
    counts = torch.tensor([2, 3])
    kept = torch.randn(2, 3, 3, requires_grad=True)
    out = restore_tokens(saved, kept, index, counts)
    expected = saved.detach().clone()
    expected[0, 1], expected[0, 4] = kept[0, 0], kept[0, 1]
    expected[1, 2], expected[1, 3], expected[1, 5] = kept[1, 0], kept[1, 1], kept[1, 2]
    assert torch.equal(out, expected)
    grad = torch.randn_like(out)
    out.backward(grad)
    saved_grad = grad.clone()
    saved_grad[0, [1, 4]] = 0
    saved_grad[1, [2, 3, 5]] = 0
    assert torch.equal(saved.grad, saved_grad)
    kept_grad = torch.stack([grad[0, [1, 4, 0]], grad[1, [2, 3, 5]]])
    kept_grad[0, 2] = 0  # unused slot
    assert torch.equal(kept.grad, kept_grad)


class Identity(torch.nn.Module):
    def forward(self, x, x_lens, kv=None, kv_lens=None):
        return x


class Recorder(torch.nn.Module):
    """Adds 1 to its tokens and records what it saw, to check the schedule."""

    def __init__(self, log, name):
        super().__init__()
        self.log, self.name = log, name

    def forward(self, x, x_lens, kv=None, kv_lens=None):
        self.log.append((self.name, x.shape[1], None if kv is None else kv.shape[1]))
        return x + 1


def test_token_drop_encoder_with_identity_layers_returns_its_input():
    encoder = TokenDropEncoder([Identity() for _ in range(6)], keep=0.5)
    x = torch.randn(3, 10, 4)
    lengths = torch.tensor([10, 7, 1])
    assert torch.equal(encoder(x, lengths, torch.randn(3, 10)), x)


@pytest.mark.parametrize(("num_layers", "start", "end"), [(12, None, None), (4, None, None), (6, 1, 4), (3, 0, 3)])
def test_token_drop_schedule(num_layers, start, end):
    log = []
    encoder = TokenDropEncoder(
        [Recorder(log, i) for i in range(num_layers)], keep=0.5, start_layer=start, end_layer=end
    )
    x = torch.zeros(2, 8, 1)
    scores = torch.arange(16.0).view(2, 8)
    out = encoder(x, torch.tensor([8, 6]), scores)
    start = num_layers // 2 - 1 if start is None else start
    end = num_layers - 1 if end is None else end
    expected = [(i, 8, None) for i in range(start)] + [(start, 4, 8)]
    expected += [(i, 4, None) for i in range(start + 1, end)] + [(i, 8, None) for i in range(end, num_layers)]
    assert log == expected
    # Row 1 keeps ceil(0.5 * 6) = 3 tokens: its three best-scored real positions 3, 4, 5.
    assert out[1, :, 0].tolist() == [start + num_layers - end] * 3 + [num_layers] * 3 + [start + num_layers - end] * 2
    assert out[0, :, 0].tolist() == [start + num_layers - end] * 4 + [num_layers] * 4


def reference_importance(table, labels, losses, beta, allow, pad):
    table = table.clone()
    groups = {}
    for label, loss in zip(labels.tolist(), losses.tolist(), strict=True):
        if label >= 0 and math.isfinite(loss):
            groups.setdefault(label, []).append(loss)
    for token, values in groups.items():
        table[token] = beta * table[token] + (1 - beta) * sum(values) / len(values)
    table[allow] = float("inf")
    table[pad] = float("-inf")
    return table


@given(
    st.lists(
        st.tuples(
            st.sampled_from([-100, 0, 1, 2, 3, 5, 5, 9]),
            st.floats(0, 20) | st.sampled_from([float("nan"), float("inf")]),
        ),
        min_size=1,
        max_size=40,
    ),
    st.integers(1, 3),
)
def test_importance_update_matches_slow_reference(pairs, steps):
    importance = TokenImportance(10, beta=0.9, init_value=10.0, allow_ids=[1, 2], pad_id=0)
    labels = torch.tensor([p[0] for p in pairs])
    losses = torch.tensor([p[1] for p in pairs])
    expected = importance.table.clone()
    for _ in range(steps):
        importance.update(labels, losses)
        expected = reference_importance(expected, labels, losses, 0.9, [1, 2], 0)
    torch.testing.assert_close(importance.table, expected, rtol=1e-6, atol=1e-6)


def test_importance_is_frozen_in_eval_and_saved_in_state_dict():
    importance = TokenImportance(6, allow_ids=[1], pad_id=0)
    importance.eval()
    importance.update(torch.tensor([3, 4]), torch.tensor([1.0, 2.0]))
    assert torch.equal(importance.table, torch.tensor([float("-inf"), float("inf"), 10, 10, 10, 10]))
    importance.train()
    importance.update(torch.tensor([3, 3, 1, 0]), torch.tensor([1.0, 3.0, 0.0, 0.0]))
    assert importance.table[3].item() == pytest.approx(0.995 * 10 + 0.005 * 2.0)
    assert importance.table[1] == float("inf") and importance.table[0] == float("-inf")
    restored = TokenImportance(6, allow_ids=[1], pad_id=0)
    restored.load_state_dict(importance.state_dict())
    assert torch.equal(restored.table, importance.table)


def test_random_importance_keeps_pins_and_varies():
    importance = TokenImportance(8, mode="random", allow_ids=[2], pad_id=0)
    ids = torch.tensor([[2, 5, 5, 6, 0]])
    first, second = importance.scores(ids), importance.scores(ids)
    assert first[0, 0] == float("inf") and first[0, 4] == float("-inf")
    assert not torch.equal(first[0, 1:4], second[0, 1:4])
    assert bool(((first[0, 1:4] >= 0) & (first[0, 1:4] < 1)).all())


def test_kept_counts_rounding():
    lengths = torch.tensor([10, 7, 1, 3])
    assert kept_counts(lengths, 0.3).tolist() == [3, 3, 1, 1]
    assert kept_counts(lengths, 5).tolist() == [5, 5, 1, 3]


def test_encoders_reject_lengths_and_indices_outside_their_tensors():
    config = BertConfig(vocab_size=10, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    x = torch.randn(2, 6, 16)
    token_drop = TokenDropEncoder([BertLayer(config) for _ in range(4)])
    with pytest.raises(ValueError, match="sequence 1 has q_lens=7"):
        token_drop(x, torch.tensor([6, 7]), torch.randn(2, 6))
    narrow = NarrowEncoder([BertLayer(config), BertLayer(config)], full_layers=1)
    with pytest.raises(ValueError, match="sequence 0 has q_lens=2, k_lens=0"):
        narrow(x, torch.tensor([0, 6]), torch.tensor([[0, 5], [1, 2]]), torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="query_index and query_lens must be given together"):
        narrow(x, torch.tensor([6, 6]), torch.tensor([[0, 5], [1, 2]]))
    with pytest.raises(ValueError, match="query_index row 0 holds"):
        narrow(x, torch.tensor([6, 6]), torch.tensor([[0, 6], [1, 2]]), torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="sequence 1 has q_lens=3"):
        narrow(x, torch.tensor([6, 6]), torch.tensor([[0, 5], [1, 2]]), torch.tensor([2, 3]))
