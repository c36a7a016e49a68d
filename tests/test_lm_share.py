"""Sharing a span of a language model's decoder layers (DESIGN §8 "share"; docs/llm.md "Sharing layers"):
parameter counts counted independently, the average/first/last initialization and the per-iteration norms
against the original layers' tensors, full-rank SVD-LoRA reproducing the original logits (Llama, GPT-2's
transposed Conv1D, Gemma 2), period 2, generation with a KV cache, the checkpoint reloaded by `eval`,
rp.share / rp.save / rp.load, and bad inputs as one line each."""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("transformers")

from conftest import invoke  # noqa: E402
from test_bad_inputs import fails  # noqa: E402
from tinylms import save_model, write_text  # noqa: E402
from tinylms import make_model as _make_model  # noqa: E402

from resprobe.share import SharedIteration  # noqa: E402
from resprobe.share_lm import SpanOptions, share_span  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
LAYERS = 4  # period 2 over 0:4 loops two shared layers twice


def make_model(arch: str):
    return _make_model(arch, num_hidden_layers=LAYERS)


def layer_list(model) -> list:
    from resprobe.models.causal_lm import decoder_layers

    return list(decoder_layers(model)[1])


def distinct_params(model) -> int:
    """Parameters counted by storage: each distinct tensor once (tied embeddings, shared layers)."""
    return sum(p.numel() for p in {(p.data_ptr(), p.shape): p for p in model.parameters()}.values())


def is_norm_name(name: str) -> bool:
    return "norm" in name or name.split(".")[0].startswith("ln_")


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(seed))


def logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


# --------------------------------------------------------------------------------------------------
# Parameter counts


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("period,rank", [(1, None), (2, None), (1, 3), (2, 5)])
def test_parameter_counts_counted_independently(arch, period, rank):
    model = make_model(arch)
    layer = layer_list(model)[0]
    shareable = sum(p.numel() for n, p in layer.named_parameters() if not is_norm_name(n))
    linears = [m for m in layer.modules() if type(m).__name__ in ("Linear", "Conv1D")]
    # a Linear's weight is [out, in], a Conv1D's [in, out]: the factors are out×r and r×in either way
    lora = sum(min(rank, *m.weight.shape) * sum(m.weight.shape) for m in linears) if rank else 0
    # with LoRA every other shared parameter (the biases) gets a per-iteration offset, as for vision
    offsets = shareable - sum(m.weight.numel() for m in linears) if rank else 0
    start, end = 0, LAYERS
    expected = distinct_params(model) - (end - start - period) * shareable + (end - start) * (lora + offsets)

    shared = copy.deepcopy(model)
    result = share_span(shared, SpanOptions(start, end, period, lora_rank=rank))
    assert result.params_before == distinct_params(model)
    assert result.params_after == distinct_params(shared) == expected
    assert result.spans[0].to_dict() == {"start": 0, "end": 4, "period": period, "iterations": 4 // period,
                                         "init": "average", "norm": "unshared", "lora_rank": rank}


# --------------------------------------------------------------------------------------------------
# Initialization and per-iteration norms


@pytest.mark.parametrize("init", ["average", "first", "last"])
def test_shared_weights_are_the_mean_first_or_last_of_the_strided_layers(init):
    model = make_model("llama")
    shared = copy.deepcopy(model)
    share_span(shared, SpanOptions(0, 4, period=2, init=init))
    layers = layer_list(model)
    iterations = layer_list(shared)
    for j in range(2):  # shared layer j replaces layers j and j+2
        block = iterations[j].shared_block
        assert iterations[j + 2].shared_block is block
        for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight"):
            a, b = layers[j].get_parameter(name), layers[j + 2].get_parameter(name)
            want = {"average": (a.double() + b.double()) / 2, "first": a, "last": b}[init]
            torch.testing.assert_close(block.get_parameter(name).double(), want.double(), rtol=0, atol=1e-7)
    assert iterations[0].shared_block is not iterations[1].shared_block


def test_unshared_norms_start_from_the_replaced_layers_and_shared_norms_are_averaged():
    model = make_model("qwen3")  # norms inside attention too (q_norm, k_norm)
    norms = [n for n, _ in layer_list(model)[0].named_parameters() if is_norm_name(n)]
    assert "self_attn.q_norm.weight" in norms
    unshared = copy.deepcopy(model)
    share_span(unshared, SpanOptions(1, 4, norm="unshared"))
    for t, i in enumerate(range(1, 4)):
        iteration = layer_list(unshared)[i]
        assert isinstance(iteration, SharedIteration) and iteration.iteration == t
        for name in norms:
            assert torch.equal(iteration.get_parameter(name), layer_list(model)[i].get_parameter(name)), name
            assert iteration.get_parameter(name).data_ptr() != layer_list(unshared)[1].get_parameter(name).data_ptr() \
                or i == 1
    naive = copy.deepcopy(model)
    share_span(naive, SpanOptions(1, 4, norm="shared"))
    block = layer_list(naive)[1].shared_block
    for name in norms:
        mean = torch.stack([layer_list(model)[i].get_parameter(name).double() for i in range(1, 4)]).mean(0)
        torch.testing.assert_close(block.get_parameter(name).double(), mean, rtol=0, atol=1e-7)
        assert not any(True for _ in layer_list(naive)[2].parameters())  # nothing of its own


def test_iterations_keep_their_layer_index():
    original = make_model("gemma2")  # alternating sliding and full attention: per-layer settings
    model = copy.deepcopy(original)
    share_span(model, SpanOptions(0, 4, period=1))
    for t, iteration in enumerate(layer_list(model)):
        assert iteration.config[("self_attn", "layer_idx")] == t
        # inside the iteration the shared block runs as layer t, then goes back
        with iteration.running() as block:
            assert block.self_attn.layer_idx == t
            assert block.self_attn.sliding_window == layer_list(original)[t].self_attn.sliding_window
            assert block.self_attn.layer_type == layer_list(original)[t].self_attn.layer_type


# --------------------------------------------------------------------------------------------------
# LoRA at full rank reproduces the original model


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "qwen2"])
@pytest.mark.parametrize("period,init", [(1, "average"), (2, "first")])
def test_full_rank_lora_reproduces_the_original_logits(arch, period, init):
    model = make_model(arch)
    x = ids()
    reference = logits(model, x)
    shared = copy.deepcopy(model)
    share_span(shared, SpanOptions(0, LAYERS, period, init=init, lora_rank=10**6))
    torch.testing.assert_close(logits(shared, x), reference, rtol=0, atol=1e-5)
    assert not torch.allclose(logits(_shared(model, period, None), x), reference, atol=1e-3)  # LoRA did it


def _shared(model, period: int, rank: int | None):
    new = copy.deepcopy(model)
    share_span(new, SpanOptions(0, LAYERS, period, lora_rank=rank))
    return new


def test_conv1d_factors_map_inputs_to_outputs_and_biases_get_offsets():
    model = make_model("gpt2")
    shared = _shared(model, 1, 4)
    iteration = layer_list(shared)[2]
    factors = iteration.lora.get_submodule("attn.c_attn")
    weight = iteration.shared_block.attn.c_attn.weight  # Conv1D: [in 32, out 96]
    assert list(weight.shape) == [32, 96]
    assert list(factors.B.shape) == [96, 4] and list(factors.A.shape) == [4, 32]
    # the correction is the rank-4 SVD truncation of layer 2's difference (Eckart–Young: no other rank-4
    # matrix is closer), computed here on the [out, in] matrices
    diff = (layer_list(model)[2].attn.c_attn.weight - weight).T.double()
    U, S, Vh = torch.linalg.svd(diff)
    torch.testing.assert_close((factors.B @ factors.A).double(), (U[:, :4] * S[:4]) @ Vh[:4], rtol=0, atol=1e-6)
    own = [n for n, _ in iteration.named_parameters()]
    assert own and all(n.startswith(("ln_1.", "ln_2.")) or n.endswith((".A", ".B", ".delta")) for n in own), own
    # a bias keeps the shared value plus this iteration's offset, initialized to layer 2's own bias
    offset = iteration.lora.get_submodule("attn.c_attn.bias").delta
    torch.testing.assert_close(iteration.shared_block.attn.c_attn.bias + offset, layer_list(model)[2].attn.c_attn.bias)


# --------------------------------------------------------------------------------------------------
# Generation with a KV cache


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_generation_with_a_kv_cache_equals_generation_without(arch):
    model = make_model(arch)
    shared = _shared(model, 2, 3)
    prompt = ids(1)[:1, :6]
    with torch.no_grad():
        cached = shared.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True)
        uncached = shared.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    # and each step's logits with the cache equal a full forward (the cache slots are per layer index)
    with torch.no_grad():
        cache = shared(input_ids=prompt, use_cache=True).cache
        step = shared(input_ids=cached[:, 6:7], cache=cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, logits(shared, cached[:, :7])[:, -1], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# The command line and the checkpoint


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("lm") / "tiny-llama4", "llama", num_hidden_layers=LAYERS)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("text") / "doc.txt", repeats=2)


def test_share_writes_a_checkpoint_that_every_command_loads(lm_dir, text, tmp_path):
    out = tmp_path / "shared.pt"
    data = ["--data", f"text:{text}", "--seq-len", 16, "--device", "cpu", "-b", 4]
    report = json.loads(invoke("share", lm_dir, "--span", "0:4", "--period", 2, "--lora-rank", 3, "--out", out,
                               *data, "-f", "json", "-q").stdout)
    assert report["spans"] == [{"start": 0, "end": 4, "period": 2, "iterations": 2, "init": "average",
                                "norm": "unshared", "lora_rank": 3}]
    assert [s["blocks"] for s in report["stages"]] == [["model.layers.0", "model.layers.2"],
                                                       ["model.layers.1", "model.layers.3"]]
    assert report["params_after"] < report["params_before"]
    original = json.loads(invoke("eval", lm_dir, *data, "-f", "json", "-q").stdout)
    reloaded = json.loads(invoke("eval", out, *data, "-f", "json", "-q").stdout)
    for key in ("loss", "perplexity", "n_tokens"):
        assert report["eval_original"][key] == pytest.approx(original[key], rel=1e-6)
        assert report["eval_shared"][key] == pytest.approx(reloaded[key], rel=1e-6)
    # the protocol holds strings (the tokenizer, the join): compared exactly, not approximately
    assert report["eval_original"]["protocol"] == original["protocol"]
    assert report["eval_shared"]["protocol"] == reloaded["protocol"]
    assert report["eval_shared"]["loss"] != pytest.approx(original["loss"], rel=1e-6)
    blocks = json.loads(invoke("blocks", out, "-f", "json").stdout)
    assert blocks["params"] == report["params_after"]
    run = tmp_path / "run.h5"
    invoke("record", out, *data, "--limit", 3, "--out", run, "-q")
    aligned = json.loads(invoke("align", run, "-f", "json").stdout)
    assert [b["name"] for b in aligned["blocks"]] == [f"model.layers.{i}" for i in range(LAYERS)]
    # the text table renders too
    assert "perplexity" in invoke("share", lm_dir, "--span", "1:3", "--out", tmp_path / "t.pt", *data).stdout


def test_a_shared_checkpoint_rebuilds_the_same_model(lm_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from resprobe.models.causal_lm import load_lm

    out = tmp_path / "shared.pt"
    invoke("share", lm_dir, "--span", "1:4", "--norm", "shared", "--init", "last", "--lora-rank", 2, "--out", out,
           "-q")
    expected = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    share_span(expected, SpanOptions(1, 4, init="last", norm="shared", lora_rank=2))
    x = ids(2)
    torch.testing.assert_close(logits(load_lm(str(out)).model, x), logits(expected, x), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# rp.share, rp.save, rp.load


def test_rp_share_returns_a_shared_copy_and_rp_save_load_gives_it_back(tmp_path):
    import resprobe as rp

    model = make_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shared = rp.share(model, span=(0, 4), period=2, init="first", lora_rank=2)
    assert type(shared) is type(model)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # the original untouched
    assert not any(isinstance(m, SharedIteration) for m in model.modules())
    assert distinct_params(shared) < distinct_params(model)
    path = rp.save(shared, tmp_path / "s.pt")
    x = ids(3)
    torch.testing.assert_close(logits(rp.load(path), x), logits(shared, x), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Bad inputs: one line each


@pytest.mark.parametrize("args,expect", [
    (["--span", "0:3", "--period", 2], "does not divide"),
    (["--span", "2:9"], "out of range"),
    (["--span", "2:3"], "one layer"),
    (["--span", "3:1"], "A < B"),
    (["--span", "two"], "A:B"),
    (["--span", "0:4", "--period", 4], "once"),
    (["--span", "0:4", "--period", 0], "at least 1"),
    (["--span", "0:4", "--lora-rank", 0], "at least 1"),
    (["--span", "0:4", "--init", "mean"], "--init"),
    (["--span", "0:4", "--norm", "none"], "--norm"),
    (["--span", "0:4", "--stages", "0"], "--stages"),
    (["--span", "0:4", "--recalibrate", 3], "--recalibrate"),
    ([], "--span"),
])
def test_bad_inputs_are_one_line(lm_dir, tmp_path, args, expect):
    fails("share", lm_dir, *args, "--out", tmp_path / "x.pt", expect=expect)


def test_span_of_a_vision_model_is_refused(tmp_path):
    fails("share", "fixtures/tiny_resnet.pt", "--span", "0:2", "--out", tmp_path / "x.pt", expect="language model")


class PassThrough(torch.nn.Module):
    """A removed layer: returns its input hidden states."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def test_ablate_of_a_shared_checkpoint_equals_a_naive_forward_without_each_layer(lm_dir, text, tmp_path):
    """LM ablate (issue 26's ablate part) on a shared model: each removal's loss equals the shared model
    run with that iteration replaced by a pass-through (the other iterations of its shared layer kept)."""
    pytest.importorskip("resprobe.ablate_lm")
    from resprobe.evaluate_lm import evaluate_lm
    from resprobe.lm_probe import open_lm_probe

    out = tmp_path / "shared.pt"
    invoke("share", lm_dir, "--span", "0:4", "--period", 2, "--lora-rank", 2, "--out", out, "-q")
    data = ["--data", f"text:{text}", "--seq-len", 16, "--limit", 5, "--device", "cpu", "-b", 2]
    report = json.loads(invoke("ablate", out, *data, "-q", "-f", "json").stdout)
    probe = open_lm_probe(str(out), device="cpu", seq_len=16)
    loader = probe.loader(probe.data(f"text:{text}", 5, 0), 2)
    layers = probe.model.model.layers
    for i, block in enumerate(report["blocks"]):
        kept = layers[i]
        layers[i] = PassThrough()
        try:
            expected = evaluate_lm(probe.model, loader, torch.device("cpu"))["loss"]
        finally:
            layers[i] = kept
        assert block["name"] == f"model.layers.{i}"
        assert block["loss"] == pytest.approx(expected, rel=1e-6)


def test_sublayer_units_of_a_shared_model(lm_dir, text, tmp_path):
    """Per-iteration norms: each iteration's MLP entry is its own norm, so sublayer units work (and
    their statistics equal the unshared model's at full rank); shared norms: refused in one line."""
    common = ["--data", f"text:{text}", "--seq-len", 16, "--limit", 3, "--device", "cpu", "-q", "-f", "json",
              "--granularity", "sublayer"]
    full = tmp_path / "full.pt"
    invoke("share", lm_dir, "--span", "0:4", "--period", 2, "--lora-rank", 1000, "--out", full, "-q")
    shared = json.loads(invoke("align", full, *common).stdout)
    original = json.loads(invoke("align", lm_dir, *common).stdout)
    assert [b["name"] for b in shared["blocks"]] == [b["name"] for b in original["blocks"]]
    for a, b in zip(shared["blocks"], original["blocks"]):
        assert a["cos_mean"] == pytest.approx(b["cos_mean"], abs=1e-4)
        assert a["l2_ratio_mean"] == pytest.approx(b["l2_ratio_mean"], rel=1e-4)
    naive = tmp_path / "naive.pt"
    invoke("share", lm_dir, "--span", "0:4", "--norm", "shared", "--out", naive, "-q")
    fails("align", naive, *common, expect="--granularity layer")


def test_gradients_reach_shared_weights_lora_factors_and_own_norms():
    import resprobe as rp

    model = make_model("gpt2").requires_grad_(True)
    shared = rp.share(model, span=(1, 4), lora_rank=2)
    shared(input_ids=ids(), labels=ids()).loss.backward()
    iteration = layer_list(shared)[2]
    assert iteration.shared_block.attn.c_attn.weight.grad.abs().sum() > 0
    assert iteration.lora.get_submodule("attn.c_attn").A.grad.abs().sum() > 0
    assert iteration.ln_1.weight.grad.abs().sum() > 0


def test_a_span_already_shared_is_refused():
    model = _shared(make_model("llama"), 1, None)
    with pytest.raises(Exception, match="already shared"):
        share_span(model, SpanOptions(1, 3))
