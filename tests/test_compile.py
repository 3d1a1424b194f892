"""torch.compile(fullgraph=True) of every mode: trains, matches eager, never recompiles. On CPU with the
SDPA backend; on a GPU with the Triton kernels, which must also match SDPA."""

import copy
import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

import tokdrop

CONFIG = tokdrop.BertConfig(
    vocab_size=120,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=32,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    max_predictions_per_seq=5,
    attn_backend="sdpa",
)
MODES = {
    "dense": {},
    "token_drop": {"token_drop": tokdrop.TokenDropConfig(keep=0.5, allow_ids=(1, 2))},
    "narrow": {"narrow": tokdrop.NarrowConfig(full_layers=2)},
}


def batches(steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        lengths = torch.randint(4, 17, (3,), generator=g)
        mask = (torch.arange(16) < lengths[:, None]).long()
        ids = torch.randint(3, CONFIG.vocab_size, (3, 16), generator=g) * mask
        chosen = torch.rand(ids.shape, generator=g).argsort(1)[:, :4]
        labels = torch.full_like(ids, -100).scatter(1, chosen, ids.gather(1, chosen))
        yield ids, mask, torch.where(mask.bool(), labels, -100)


def check_compiled_training(config, mode, device):
    """4 AdamW steps eager and compiled (fullgraph, default inductor) from the same weights: equal losses,
    one graph, no recompilation across batches, equal importance tables."""
    torch.manual_seed(0)
    eager = tokdrop.BertForMaskedLM(dataclasses.replace(config, **MODES[mode])).to(device).train()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (eager, compiled_model)]
    torch.compiler.reset()
    counters.clear()
    graphs_after_first = None
    for step, batch in enumerate(batches(4)):
        ids, mask, labels = (t.to(device) for t in batch)
        losses = []
        for model, optimizer in zip((eager, compiled), optimizers, strict=True):
            loss = model(ids, mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
        if step == 0:
            graphs_after_first = counters["stats"]["unique_graphs"]
    assert graphs_after_first == 1, "one graph: no graph break"
    assert counters["stats"]["unique_graphs"] == graphs_after_first, "recompiled for a batch of the same shape"
    if mode == "token_drop":
        torch.testing.assert_close(compiled_model.bert.token_importance.table, eager.bert.token_importance.table)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_compiled_training_matches_eager_without_recompiling(mode):
    check_compiled_training(CONFIG, mode, "cpu")


# head_dim 32: a size the Triton kernels take (they would hand head_dim 16 to SDPA).
TRITON_CONFIG = dataclasses.replace(CONFIG, hidden_size=64, intermediate_size=128, attn_backend="triton")


@pytest.mark.needs_cuda
@pytest.mark.parametrize("mode", sorted(MODES))
def test_gpu_model_on_triton_kernels_compiles_and_matches_sdpa(gpu_summary, mode):
    """The whole model on the Triton kernels (perf/results/gpu_test_compile.json via gpu_summary)."""
    with gpu_summary.check(f"model/{mode}/triton_vs_sdpa_and_compile_fullgraph_inductor"):
        assert tokdrop.BertModel(TRITON_CONFIG).cuda().attention_backend().name == "triton"
        ids, mask, _ = (t.cuda() for t in next(batches(1)))
        states = []
        for backend in ("triton", "sdpa"):
            torch.manual_seed(0)
            # Wide initial weights: far-from-uniform attention, so a wrong kernel shows.
            config = dataclasses.replace(TRITON_CONFIG, attn_backend=backend, initializer_range=0.5, **MODES[mode])
            states.append(tokdrop.BertModel(config).cuda().train()(ids, mask).last_hidden_state[mask.bool()])
        torch.testing.assert_close(states[0], states[1], rtol=1e-4, atol=1e-4)
        check_compiled_training(TRITON_CONFIG, mode, "cuda")


def test_a_backend_fallback_compiles_fullgraph_and_shows_in_the_repr():
    """attn_backend="triton" at head_dim 16, which the kernels lack: SDPA stands in, named in the
    model's repr, and the compiled model is one graph equal to eager."""
    config = dataclasses.replace(CONFIG, attn_backend="triton")  # head_dim 32 / 2 heads = 16
    torch.manual_seed(0)
    model = tokdrop.BertModel(config).eval()
    assert "Backend('sdpa', standing in for 'triton': head_dim 16" in repr(model)
    ids, mask, _ = next(batches(1))
    torch.compiler.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(ids, mask).last_hidden_state, model(ids, mask).last_hidden_state)
    assert counters["stats"]["unique_graphs"] == 1
