"""``ablate`` on language models (DESIGN §8): every removal through the prefix cache against a naive
forward without those layers (written here by hand), sublayer removal against the halves computed by
hand, the proxies against output_hidden_states + numpy and plain autograd, the pruned folder loaded
by plain transformers in a process without resprobe, bad inputs as one line."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

pytest.importorskip("transformers")

from conftest import invoke  # noqa: E402
from test_bad_inputs import fails  # noqa: E402
from tinylms import ARCHITECTURES, make_model, save_model, write_text  # noqa: E402

from resprobe.ablate_lm import LMAblateOptions, run_lm_ablation  # noqa: E402
from resprobe.lm_probe import LMProbe  # noqa: E402
from resprobe.models.causal_lm import LoadedLM  # noqa: E402
from resprobe.runtime import make_runtime  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
SEQ = 16


def probe_of(model: nn.Module, granularity: str = "layer") -> LMProbe:
    loaded = LoadedLM("memory", "memory", None, model, None, None, 128)
    return LMProbe(loaded, make_runtime("cpu"), granularity, seq_len=SEQ)


def windows(batches: int = 2, batch: int = 3, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(batches):
        first = torch.zeros(batch, dtype=torch.long)
        first[-1] = 5  # a window whose first predictions an earlier window scored (--stride)
        out.append((torch.randint(3, 300, (batch, SEQ), generator=g), first, torch.arange(b * batch, (b + 1) * batch)))
    return out


def nll_per_token(logits: torch.Tensor, ids: torch.Tensor, first: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL over the scored predictions (position t predicts t + 1, t ≥ first)."""
    total, count = 0.0, 0
    for n in range(len(ids)):
        start = int(first[n])
        nll = F.cross_entropy(logits[n, start:-1].double(), ids[n, start + 1:], reduction="sum")
        total, count = total + float(nll), count + (SEQ - 1 - start)
    return total, count


def without_layers(model: nn.Module, skip: set[int]) -> nn.Module:
    """A copy of ``model`` whose layer list lacks ``skip``: layer_idx renumbered, per-layer config lists trimmed."""
    m = copy.deepcopy(model)
    holder = m.gpt_neox if hasattr(m, "gpt_neox") else m.transformer if hasattr(m, "transformer") else m.model
    attr = "h" if hasattr(holder, "h") else "layers"
    kept = [layer for i, layer in enumerate(getattr(holder, attr)) if i not in skip]
    setattr(holder, attr, nn.ModuleList(kept))
    m.config.num_hidden_layers = len(kept)
    if getattr(m.config, "layer_types", None) is not None:
        m.config.layer_types = [t for i, t in enumerate(m.config.layer_types) if i not in skip]
    for new, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new
    return m


@torch.no_grad()
def naive_loss(model: nn.Module, data, skip: set[int]) -> float:
    m = without_layers(model, skip) if skip else model
    total, count = 0.0, 0
    for ids, first, _ in data:
        t, c = nll_per_token(m(input_ids=ids, use_cache=False).logits, ids, first)
        total, count = total + t, count + c
    return total / count


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_removal_pair_and_span_equals_a_forward_without_those_layers(arch):
    model = make_model(arch)
    data = windows()
    report = run_lm_ablation(probe_of(model), data, LMAblateOptions(spans=3))
    assert report["baseline"]["loss"] == pytest.approx(naive_loss(model, data, set()), rel=1e-6)
    for j, block in enumerate(report["blocks"]):
        expected = naive_loss(model, data, {j})
        assert block["loss"] == pytest.approx(expected, rel=1e-6), block["name"]
        assert block["delta_loss"] != 0
        assert block["perplexity"] == pytest.approx(math.exp(expected), rel=1e-6)
    for span in report["spans"]:
        skip = set(range(span["start"], span["start"] + span["length"]))
        if len(skip) < 3:
            assert span["loss"] == pytest.approx(naive_loss(model, data, skip), rel=1e-6), span
    pair = run_lm_ablation(probe_of(model), data, LMAblateOptions(one_shot=2))["cumulative"][2]
    skip = {int(name.rsplit(".", 1)[1]) for name in pair["removed"]}
    assert pair["loss"] == pytest.approx(naive_loss(model, data, skip), rel=1e-6)


def test_greedy_curve_equals_sleb_by_hand():
    model = make_model("llama", num_hidden_layers=4)
    data = windows()
    curve = run_lm_ablation(probe_of(model), data, LMAblateOptions(cumulative=3))["cumulative"]
    removed: set[int] = set()
    for k in range(1, 4):
        losses = {j: naive_loss(model, data, removed | {j}) for j in range(4) if j not in removed}
        pick = min(losses, key=lambda j: (losses[j], -j))  # least harmful; among ties the later layer
        removed.add(pick)
        assert curve[k]["block"] == f"model.layers.{pick}"
        assert curve[k]["loss"] == pytest.approx(losses[pick], rel=1e-6)


def _halves(arch: str, layer: nn.Module):
    """The attention and MLP updates of a layer, written out for Llama and Gemma 2."""
    if arch == "llama":
        def attn(h, kw):
            return layer.self_attn(hidden_states=layer.input_layernorm(h), **kw)[0]

        def mlp(h):
            return layer.mlp(layer.post_attention_layernorm(h))
    else:
        def attn(h, kw):
            return layer.post_attention_layernorm(layer.self_attn(hidden_states=layer.input_layernorm(h), **kw)[0])

        def mlp(h):
            return layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
    return attn, mlp


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_sublayer_removal_equals_the_halves_by_hand(arch):
    model = make_model(arch)
    data = windows(1)
    report = run_lm_ablation(probe_of(model, "sublayer"), data, LMAblateOptions())
    by_name = {b["name"]: b["loss"] for b in report["blocks"]}
    assert len(by_name) == 6
    for j in range(3):
        layer = model.model.layers[j]
        attn, mlp = _halves(arch, layer)
        for part in ("attn", "mlp"):
            def by_hand(h, *args, part=part, attn=attn, mlp=mlp, **kw):
                kw = {k: v for k, v in kw.items() if k != "hidden_states"}
                if part == "attn":
                    return h + mlp(h)  # the attention update gone: the MLP reads h
                return h + attn(h, kw)  # the MLP update gone: the layer returns h1

            layer.forward = by_hand
            try:
                expected = naive_loss(model, data, set())
            finally:
                del layer.forward
            assert by_name[f"model.layers.{j}:{part}"] == pytest.approx(expected, rel=1e-6), (j, part)


def test_proxies_equal_hidden_states_and_autograd_by_hand():
    model = make_model("llama", num_hidden_layers=4)
    data = windows(1, batch=4)
    ids, first, _ = data[0]
    first = torch.zeros_like(first)
    data = [(ids, first, torch.arange(4))]
    report = run_lm_ablation(probe_of(model), data, LMAblateOptions(proxies=True))
    rows = report["proxies"]["blocks"]
    layers = model.model.layers
    outs: dict[int, torch.Tensor] = {}
    handles = [layer.register_forward_hook(lambda _m, _a, o, i=i: outs.__setitem__(i, o)) for i, layer in
               enumerate(layers)]
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    for handle in handles:
        handle.remove()
    for j in range(4):
        h = hidden[j].double().numpy()
        out = (hidden[j + 1] if j < 3 else outs[3]).double().numpy()  # the last hidden state is normed
        cos = (h * out).sum(-1) / np.linalg.norm(h, axis=-1) / np.linalg.norm(out, axis=-1)  # [B, T]
        assert rows[j]["bi"] == pytest.approx(float((1 - cos).mean()), rel=1e-4, abs=1e-7)
        assert rows[j]["angular"] == pytest.approx(float((np.arccos(np.clip(cos, -1, 1)) / np.pi).mean()), rel=1e-4)
        assert rows[j]["angular_last"] == pytest.approx(float((np.arccos(np.clip(cos[:, -1], -1, 1)) / np.pi).mean()),
                                                        rel=1e-4)
    # taylor = −Σ⟨U, ∂ℓ/∂out⟩ / n_tokens; cos = mean over windows of cos(U, ∂ℓ/∂h): plain autograd
    ins: dict[int, torch.Tensor] = {}

    def pre(_m, args, kwargs, i):
        h = args[0] if args else kwargs["hidden_states"]
        h.retain_grad()
        ins[i] = h

    def post(_m, _a, o, i):
        o.retain_grad()
        outs[i] = o

    handles = [layer.register_forward_pre_hook(lambda m, a, k, i=i: pre(m, a, k, i), with_kwargs=True)
               for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(lambda m, a, o, i=i: post(m, a, o, i)) for i, layer in enumerate(layers)]
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds, use_cache=False).logits
    for handle in handles:
        handle.remove()
    total, count = nll_per_token(logits, ids, first)
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
    nll.backward()
    for j in range(4):
        u = (outs[j] - ins[j]).detach().double()
        taylor = -float((u * outs[j].grad.double()).sum()) / count
        g = ins[j].grad.double()
        cos = [float((u[n] * g[n]).sum() / u[n].norm() / g[n].norm()) for n in range(len(ids))]
        assert rows[j]["taylor"] == pytest.approx(taylor, rel=1e-4, abs=1e-9)
        assert rows[j]["cos"] == pytest.approx(float(np.mean(cos)), rel=1e-4, abs=1e-7)
    exact = [b["delta_loss"] for b in report["blocks"]]
    from scipy.stats import kendalltau, spearmanr  # noqa: PLC0415 - an independent implementation

    bi = [r["bi"] for r in rows]
    assert report["proxies"]["correlation"]["bi"]["spearman"] == pytest.approx(spearmanr(bi, exact)[0])
    assert report["proxies"]["correlation"]["bi"]["kendall"] == pytest.approx(kendalltau(bi, exact)[0])


RELOAD = textwrap.dedent("""
    import json, sys
    import torch
    from torch.nn import functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, text_path, seq = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("\\n\\n".join([open(text_path).read()]), return_tensors="pt").input_ids[0]
    n = len(ids) // seq
    windows = ids[:n * seq].view(n, seq)
    with torch.no_grad():
        logits = model(input_ids=windows, use_cache=False).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), windows[:, 1:].reshape(-1),
                          reduction="sum")
    prompt = windows[:1, :6]
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    plain = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert "resprobe" not in sys.modules
    print(json.dumps({"loss": float(nll) / (n * (seq - 1)), "layers": model.config.num_hidden_layers,
                      "same_generation": bool(torch.equal(cached, plain)), "generated": cached.tolist()}))
""")


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt_neox"])
def test_pruned_folder_loads_in_plain_transformers_with_the_curves_perplexity(tmp_path, arch):
    model = save_model(tmp_path / "lm", arch, num_hidden_layers=4)
    text = write_text(tmp_path / "doc.txt", repeats=2)
    out = tmp_path / "pruned"
    report = json.loads(invoke("ablate", model, "--data", f"text:{text}", "--seq-len", SEQ, "--device", "cpu",
                               "--cumulative", 2, "--remove", 2, "--save-pruned", out, "-q", "-f", "json",
                               "-b", 4).stdout)
    point = report["cumulative"][2]
    assert report["pruned"]["removed"] == point["removed"] and (out / "model.safetensors").is_file()
    result = subprocess.run([sys.executable, "-c", RELOAD, str(out), str(text), str(SEQ)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    reloaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert reloaded["layers"] == 2
    assert reloaded["loss"] == pytest.approx(point["loss"], rel=1e-5)
    assert reloaded["same_generation"], reloaded
    config = json.loads((out / "config.json").read_text())
    if "layer_types" in config:
        assert len(config["layer_types"]) == 2


def test_save_pruned_refuses_bad_inputs(tmp_path):
    model = save_model(tmp_path / "lm", "llama")
    text = write_text(tmp_path / "doc.txt")
    common = [model, "--data", f"text:{text}", "--seq-len", SEQ, "--device", "cpu", "-q"]
    fails("ablate", *common, "--remove", 5, "--save-pruned", tmp_path / "a", expect="3 layers")
    fails("ablate", *common, "--remove", 3, "--save-pruned", tmp_path / "a", expect="keeps at least one")
    (tmp_path / "exists").mkdir()
    fails("ablate", *common, "--remove", 1, "--save-pruned", tmp_path / "exists", expect="--overwrite")
    (tmp_path / "exists" / "notes.txt").write_text("mine")
    fails("ablate", *common, "--remove", 1, "--save-pruned", tmp_path / "exists", "--overwrite",
          expect="no config.json")
    assert (tmp_path / "exists" / "notes.txt").read_text() == "mine"
    fails("ablate", *common, "--remove-blocks", "model.layers.9", "--save-pruned", tmp_path / "b",
          expect="no layer named")
    fails("ablate", *common, "--remove", 1, "--save-pruned", tmp_path / "c", "--granularity", "sublayer",
          expect="--granularity layer")
    fails("ablate", *common, "--unroll", "model.layers.0:1", expect="not supported for language models")
    fails("ablate", *common, "--spans", 0, expect="at least 1")


def test_notebook_ablate_of_a_pretrained_model_and_its_pruned_copy():
    import resprobe as rp

    model = make_model("llama", num_hidden_layers=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = windows()
    batches = [{"input_ids": ids} for ids, _, _ in data]
    every = [(ids, torch.zeros_like(first), i) for ids, first, i in data]
    result = rp.ablate(model, batches, one_shot=2)
    for j, block in enumerate(result.report["blocks"]):
        assert block["loss"] == pytest.approx(naive_loss(model, every, {j}), rel=1e-6)
    pruned = result.pruned(2)
    assert pruned.config.num_hidden_layers == 2 and len(model.model.layers) == 4
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1]
    assert model.config.num_hidden_layers == 4
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert naive_loss(pruned, every, set()) == pytest.approx(result.report["cumulative"][2]["loss"], rel=1e-6)
    # labels with -100 and an attention mask: the baseline is transformers' own loss
    ids = data[0][0]
    labels = ids.clone()
    labels[:, :4] = -100
    mask = torch.ones_like(ids)
    one = rp.ablate(model, [{"input_ids": ids, "labels": labels, "attention_mask": mask}])
    with torch.no_grad():
        expected = float(model(input_ids=ids, labels=labels, attention_mask=mask).loss)
    assert one.report["baseline"]["loss"] == pytest.approx(expected, rel=1e-5)
