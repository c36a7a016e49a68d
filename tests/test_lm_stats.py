"""Language models (DESIGN §8): units found on every architecture family, and every statistic
against plain autograd with hooks written here (one window at a time, its own loss, no summed-loss
trick, float64), sublayer units against the attention branch read by hand, and fidelity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

pytest.importorskip("transformers")

from tinylms import ARCHITECTURES, make_model  # noqa: E402

from resprobe.data.text import first_scored
from resprobe.models.causal_lm import lm_anatomy
from resprobe.recording.lm_recorder import LM_STAT_NAMES, LMRecorder
from resprobe.runtime import make_runtime  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers", "gpt_neox_serial": "gpt_neox.layers"}
# The test's own knowledge of where each family's attention branch output is added to the stream
# (h1 = h + that output), independent of resprobe's MLP_ENTRY table, which reads h1 elsewhere.
ATTN_BRANCH = {"llama": "self_attn", "mistral": "self_attn", "qwen2": "self_attn", "qwen3": "self_attn",
               "mixtral": "self_attn", "qwen2_moe": "self_attn", "phi3": "resid_attn_dropout",
               "gemma2": "post_attention_layernorm", "olmo2": "post_attention_layernorm", "gpt2": "attn",
               "gpt_neox_serial": "post_attention_dropout"}
T = 12


def _ids(seed: int = 0, batch: int = 3) -> torch.Tensor:
    return torch.randint(4, 300, (batch, T), generator=torch.Generator().manual_seed(seed))


def _first(tensor_output):
    return tensor_output[0] if isinstance(tensor_output, (tuple, list)) else tensor_output


def reference_window(model, ids: torch.Tensor, first: int, skip: int, arch: str, sublayer: bool) -> np.ndarray:
    """[len(LM_STAT_NAMES), n_units] for ONE window [T], by autograd on its own loss."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    layers = dict(model.named_modules())[LAYERS.get(arch, "model.layers")]

    def emb_hook(_m, _a, out):
        out = out.detach().requires_grad_(True)
        captured["emb"] = out
        return out

    handles.append(model.get_input_embeddings().register_forward_hook(emb_hook))
    for i, layer in enumerate(layers):
        def pre(_m, args, kwargs, i=i):
            captured[f"h{i}"] = args[0] if args else kwargs["hidden_states"]

        def post(_m, _a, out, i=i):
            captured[f"out{i}"] = _first(out)

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(post))
        if sublayer:
            def branch(_m, _a, out, i=i):
                captured[f"a{i}"] = _first(out)

            handles.append(getattr(layer, ATTN_BRANCH[arch]).register_forward_hook(branch))
    try:
        with torch.enable_grad():
            logits = model(input_ids=ids[None]).logits[0].double()
            logp = torch.log_softmax(logits[:-1], -1).gather(1, ids[1:, None])[:, 0]
            loss = -logp[first:].sum()
            points = []  # (h, out, a-or-None) per unit, h1 = h + a read by hand
            for i in range(len(layers)):
                h, out = captured[f"h{i}"], captured[f"out{i}"]
                if sublayer:
                    a = captured[f"a{i}"]
                    points += [(h, a, "attn"), (a, out, "mlp")]
                else:
                    points.append((h, out, "layer"))
            wanted = []
            for i in range(len(layers)):
                wanted += [captured[f"h{i}"], captured[f"out{i}"]] + ([captured[f"a{i}"]] if sublayer else [])
            grads = torch.autograd.grad(loss, wanted, allow_unused=True)
    finally:
        for hd in handles:
            hd.remove()
    g = {id(t): (gr if gr is not None else torch.zeros_like(t)) for t, gr in zip(wanted, grads)}
    cols = []
    for i in range(len(layers)):
        h, out = captured[f"h{i}"][0].double(), captured[f"out{i}"][0].double()
        g_h, g_out = g[id(captured[f"h{i}"])][0].double(), g[id(captured[f"out{i}"])][0].double()
        if sublayer:
            a = captured[f"a{i}"][0].double()
            g_a = g[id(captured[f"a{i}"])][0].double()  # = ∂ℓ/∂h1, since h1 = h + a
            units = [(h, h + a, g_h, g_a), (h + a, out, g_a, g_out)]
        else:
            units = [(h, out, g_h, g_out)]
        for hh, oo, gg, go in units:
            cols.append(_stats(hh[skip:], (oo - hh)[skip:], gg[skip:], go[skip:]))
    return np.array(cols).T


def _stats(h, u, g, g_out) -> list[float]:
    hn, un, gn = h.norm().item(), u.norm().item(), g.norm().item()
    dot = (u * g).sum().item()
    out_dot = (u * g_out).sum().item()
    cos = dot / (un * gn) if un * gn > 0 else math.nan
    tok = [(u[t] @ g[t] / (u[t].norm() * g[t].norm())).item() for t in range(len(u))
           if u[t].norm() > 0 and g[t].norm() > 0]
    tc = float(np.mean(tok)) if tok else math.nan
    return [hn, un, un, gn, dot, dot, out_dot, cos, cos, tc, tc]


def recorded(model, ids: torch.Tensor, first: torch.Tensor, skip: int, granularity: str):
    anatomy = lm_anatomy(model, T, granularity)
    with LMRecorder(anatomy, make_runtime("cpu"), skip_tokens=skip) as recorder:
        batch = recorder.run_batch(ids, first, torch.arange(len(ids)))
    return anatomy, batch


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_units_found_on_every_family(arch):
    model = make_model(arch)
    prefix = LAYERS.get(arch, "model.layers")
    assert lm_anatomy(model, T).names == [f"{prefix}.{i}" for i in range(3)]
    sub = lm_anatomy(model, T, "sublayer").names
    if arch == "gpt_neox":  # parallel residual: no point between attention and MLP, layers stay whole
        assert sub == [f"{prefix}.{i}" for i in range(3)]
    else:
        assert sub == [f"{prefix}.{i}:{part}" for i in range(3) for part in ("attn", "mlp")]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_layer_statistics_equal_plain_autograd(arch):
    model = make_model(arch)
    ids = _ids()
    first = torch.tensor([0, 3, 0])  # an overlapping window's first scored position
    skip = 2
    _, batch = recorded(model, ids, first, skip, "layer")
    for n in range(len(ids)):
        ref = reference_window(model, ids[n], int(first[n]), max(skip, int(first[n])), arch, sublayer=False)
        got = np.stack([batch.stats[s][n] for s in LM_STAT_NAMES])
        np.testing.assert_allclose(got, ref, rtol=2e-4, atol=1e-6, err_msg=arch)
    # ℓ_n: the NLL summed over the window's scored predictions; label = their count
    assert list(batch.label) == [T - 1 - int(f) for f in first]


@pytest.mark.parametrize("arch", sorted(ATTN_BRANCH))
def test_sublayer_units_equal_the_attention_branch_read_by_hand(arch):
    model = make_model(arch)
    ids = _ids(1, batch=2)
    first = torch.zeros(2, dtype=torch.long)
    _, batch = recorded(model, ids, first, 0, "sublayer")
    for n in range(len(ids)):
        ref = reference_window(model, ids[n], 0, 0, arch, sublayer=True)
        got = np.stack([batch.stats[s][n] for s in LM_STAT_NAMES])
        np.testing.assert_allclose(got, ref, rtol=2e-4, atol=1e-6, err_msg=arch)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "qwen2_moe"])
def test_logits_and_losses_with_hooks_equal_the_models_own_forward(arch):
    model = make_model(arch)
    ids = _ids(2)
    seen = []  # the head's output (Gemma2 soft-caps the logits after it), in a plain forward and when recording
    handle = model.lm_head.register_forward_hook(lambda _m, _a, out: seen.append(out.detach().clone()))
    try:
        with torch.no_grad():
            plain = model(input_ids=ids).logits
        _, batch = recorded(model, ids, torch.zeros(3, dtype=torch.long), 0, "sublayer")
    finally:
        handle.remove()
    assert torch.equal(seen[1], seen[0])
    nll = F.cross_entropy(plain[:, :-1].reshape(-1, plain.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    np.testing.assert_allclose(batch.loss, nll.view(3, -1).sum(1).numpy(), rtol=1e-6)
    assert all(p.requires_grad for p in model.parameters())  # left as they were (no freezing by the recorder)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules()
               if m is not model.lm_head)


def test_first_scored_follows_hugging_faces_stride_protocol():
    # window k > 0 scores the predictions of tokens that no earlier window predicted
    assert [first_scored(k, 10, 10) for k in range(3)] == [0, 0, 0]
    assert [first_scored(k, 10, 4) for k in range(3)] == [0, 5, 5]
    assert first_scored(1, 10, 9) == 0
