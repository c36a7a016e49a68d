"""The last-stage readout (paper §4.3) against independent computations.

The reference runs the network block by block by hand and applies the head after each last-stage
block with plain tensor operations (functional batch norm, mean pooling, a matrix product), never
the model's own ``forward_head``; the summary's loss, accuracy, entropy, margins and the
corrected/broken counts are recomputed with torch functions. A constructed case pins the counts.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import tinymodels
from conftest import DATA, MODEL
from resprobe.models.blocks import discover_blocks
from resprobe.cli import app
from resprobe.readout import BORDERLINE, summarize_readout
from resprobe.recording.recorder import Recorded, Recorder, concat_batches
from resprobe.runtime import make_runtime

CLASSES = 5

# -- three families with two or three blocks in the last stage, each split by hand --------------------


def timm_resnet():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=CLASSES, layers=[1, 1, 1, 3], channels=[8, 8, 16, 16],
                              zero_init_last=False)
    model = tinymodels.randomize_norms(model, 11).eval()
    stem = lambda x: model.maxpool(model.act1(model.bn1(model.conv1(x))))  # noqa: E731
    blocks = [(f"layer{i}.{k}", b) for i in range(1, 5) for k, b in enumerate(getattr(model, f"layer{i}"))]
    head = lambda h: h.mean((2, 3)) @ model.fc.weight.T + model.fc.bias  # noqa: E731
    return model, stem, blocks, head


def timm_resnetv2():
    """Pre-activation: the head starts with the final norm (BatchNorm + ReLU)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnetv2_50", num_classes=CLASSES, layers=[1, 1, 1, 2], channels=(16, 16, 32, 32),
                              stem_chs=8)
    model = tinymodels.randomize_norms(model, 12).eval()
    blocks = [(f"stages.{i}.blocks.{k}", b) for i, s in enumerate(model.stages) for k, b in enumerate(s.blocks)]
    n, fc = model.norm, model.head.fc  # fc is a 1×1 convolution on the pooled features

    def head(h: torch.Tensor) -> torch.Tensor:
        z = F.relu(F.batch_norm(h, n.running_mean, n.running_var, n.weight, n.bias, False, 0.0, n.eps))
        return z.mean((2, 3)) @ fc.weight.flatten(1).T + fc.bias

    return model, model.stem, blocks, head


def torchvision_resnet():
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    model = tinymodels.randomize_norms(ResNet(BasicBlock, [1, 1, 1, 2], num_classes=CLASSES), 13).eval()
    stem = lambda x: model.maxpool(model.relu(model.bn1(model.conv1(x))))  # noqa: E731
    blocks = [(f"layer{i}.{k}", b) for i in range(1, 5) for k, b in enumerate(getattr(model, f"layer{i}"))]
    head = lambda h: h.mean((2, 3)) @ model.fc.weight.T + model.fc.bias  # noqa: E731
    return model, stem, blocks, head


def hand_readout(stem, blocks, head, last: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits of the head applied after each block named in ``last``, block by block by hand."""
    out = {}
    with torch.no_grad():
        h = stem(x)
        for name, block in blocks:
            h = block(h.clone())  # clone: in-place ReLU / += in the block must not touch our copy
            if name in last:
                out[name] = head(h.clone())
    return out


def cyclic_labels(n: int) -> torch.Tensor:
    """Every class in turn: random tiny models predict much the same for every input, so this gives
    the margins their spread (the right class for some samples, each wrong one for others)."""
    return torch.arange(n) % CLASSES


def n_borderline(logits: torch.Tensor, y: torch.Tensor) -> int:
    p = logits.double().softmax(1)
    p_true = p.gather(1, y[:, None])[:, 0]
    p_other = p.scatter(1, y[:, None], float("-inf")).max(1).values
    return int(((p_true - p_other).abs() < BORDERLINE).sum())


def spread_logits(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Scale the classifier so that some examples are borderline and some are not: random tiny models
    give anything from near-uniform predictions (all borderline) to none borderline."""
    fc = model.fc if hasattr(model, "fc") else model.head.fc
    with torch.no_grad():
        logits = model(x)
        for factor in 2.0 ** np.arange(-4, 8, 0.5):
            if len(x) // 4 <= n_borderline(logits * factor, cyclic_labels(len(x))) <= 3 * len(x) // 4:
                fc.weight.mul_(factor)
                fc.bias.mul_(factor)
                return
    raise AssertionError("no classifier scale gives a mix of borderline and clear examples")


@pytest.mark.parametrize("make", [timm_resnet, timm_resnetv2, torchvision_resnet], ids=lambda f: f.__name__)
def test_readout_logits_and_summary_match_hand_computation(make):
    model, stem, blocks, head = make()
    model.requires_grad_(False)
    anatomy = discover_blocks(model, (3, 32, 32))
    last_stage = max(b.stage for b in anatomy.blocks)
    last = [b.name for b in anatomy.blocks if b.stage == last_stage]
    assert len(last) >= 2 and anatomy.names == [name for name, _ in blocks]

    g = torch.Generator().manual_seed(7)
    x = torch.randn(32, 3, 32, 32, generator=g)
    spread_logits(model, x)
    with torch.no_grad():
        final = model(x)
    y = cyclic_labels(len(x))

    with Recorder(anatomy, make_runtime("cpu"), readout=last) as recorder:
        batch = recorder.run_batch(x, y, torch.arange(32))
    want = hand_readout(stem, blocks, head, last, x)
    torch.testing.assert_close(want[last[-1]], final, rtol=1e-4, atol=1e-5)  # the hand head is the model's
    for name in last:
        np.testing.assert_allclose(batch.readout[name], want[name].numpy(), rtol=1e-4, atol=1e-5, err_msg=name)

    recorded = concat_batches([batch], [b.to_dict() for b in anatomy.blocks])
    rows = summarize_readout(recorded)
    assert [r["name"] for r in rows] == last

    # Independent summary with torch functions.
    p_final = final.double().softmax(1)
    p_true = p_final.gather(1, y[:, None])[:, 0]
    p_other = p_final.scatter(1, y[:, None], float("-inf")).max(1).values
    border = ((p_true - p_other).abs() < BORDERLINE).numpy()
    assert 0 < border.sum() < 32
    previous = None
    for row, name in zip(rows, last):
        logits = want[name].double()
        right = (logits.argmax(1) == y).numpy()
        assert row["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
        assert row["acc"] == pytest.approx(right.mean())
        entropy = torch.special.entr(logits.softmax(1)).sum(1).mean().item()
        assert row["entropy"] == pytest.approx(entropy, rel=1e-5)
        assert row["n_borderline"] == int(border.sum())
        assert row["borderline_acc"] == pytest.approx(right[border].mean())
        if previous is None:
            assert row["corrected"] is None and row["broken"] is None
        else:
            assert row["corrected"] == sum(border[i] and right[i] and not previous[i] for i in range(32))
            assert row["broken"] == sum(border[i] and not right[i] and previous[i] for i in range(32))
        previous = right


# -- a constructed case: known borderline set and known corrections ------------------------------------

# Probabilities after blocks a, b, c (c is the last: it decides which examples are borderline); label 0.
CASE = [
    # after a            after b            after c (final)      final margin
    ([0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.45, 0.40, 0.15]),  # +0.05 borderline, corrected by b
    ([0.6, 0.3, 0.1], [0.3, 0.6, 0.1], [0.40, 0.45, 0.15]),  # -0.05 borderline, broken by b
    ([0.1, 0.8, 0.1], [0.3, 0.4, 0.3], [0.48, 0.44, 0.08]),  # +0.04 borderline, corrected by c
    ([0.7, 0.2, 0.1], [0.5, 0.4, 0.1], [0.42, 0.50, 0.08]),  # -0.08 borderline, broken by c
    ([0.1, 0.8, 0.1], [0.8, 0.1, 0.1], [0.90, 0.05, 0.05]),  # +0.85 not borderline: its fix is not counted
    ([0.5, 0.3, 0.2], [0.5, 0.4, 0.1], [0.46, 0.44, 0.10]),  # +0.02 borderline, right throughout
    ([0.3, 0.6, 0.1], [0.3, 0.6, 0.1], [0.30, 0.60, 0.10]),  # -0.30 not borderline, wrong throughout
    ([0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.44, 0.55, 0.01]),  # -0.11 just outside the band: not counted
]


def constructed_recording() -> Recorded:
    probs = np.array(CASE)  # [sample, block, class]
    names = ["layer4.0", "layer4.1", "layer4.2"]
    n = len(CASE)
    return Recorded(
        block_names=names,
        blocks=[{"name": b, "stage": 3, "index": i, "kind": "identity"} for i, b in enumerate(names)],
        index=np.arange(n), label=np.zeros(n, dtype=np.int64), pred=probs[:, -1].argmax(1), loss=np.zeros(n),
        stats={}, readout={b: np.log(probs[:, i]).astype(np.float32) for i, b in enumerate(names)},
    )


def test_corrected_and_broken_on_a_constructed_case():
    rows = summarize_readout(constructed_recording())
    assert [(r["corrected"], r["broken"]) for r in rows] == [(None, None), (1, 1), (1, 1)]
    assert [r["n_borderline"] for r in rows] == [5, 5, 5]
    # borderline examples are 0, 1, 2, 3, 5; right after a: 1, 3, 5; after b: 0, 3, 5; after c: 0, 2, 5
    assert [r["borderline_acc"] for r in rows] == pytest.approx([3 / 5, 3 / 5, 3 / 5])
    assert [r["acc"] for r in rows] == pytest.approx([3 / 8, 5 / 8, 4 / 8])
    probs = np.array(CASE)
    for i, row in enumerate(rows):
        assert row["loss"] == pytest.approx(-np.log(probs[:, i, 0]).mean(), rel=1e-6)
        assert row["entropy"] == pytest.approx(-(probs[:, i] * np.log(probs[:, i])).sum(1).mean(), rel=1e-6)


def test_no_readout_gives_no_rows():
    recorded = constructed_recording()
    recorded.readout = {}
    assert summarize_readout(recorded) == []


# -- through the command line -------------------------------------------------------------------------


def test_align_readout_json_carries_the_readout(tmp_path):
    runner = CliRunner()
    out = tmp_path / "run.h5"
    result = runner.invoke(app, ["align", MODEL, "--data", DATA, "--limit", "64", "--readout", "--out", str(out),
                                 "-f", "json"])
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    rows = payload["readout"]
    last_stage = max(b["stage"] for b in payload["blocks"])
    assert [r["name"] for r in rows] == [b["name"] for b in payload["blocks"] if b["stage"] == last_stage]
    # after the last block the readout is the model itself
    assert rows[-1]["loss"] == pytest.approx(payload["loss"], rel=1e-5)
    assert rows[-1]["acc"] == pytest.approx(payload["acc"])
    assert rows[0]["corrected"] is None and isinstance(rows[1]["corrected"], int)
    for key in ("loss", "acc", "entropy", "n_borderline", "borderline_acc", "corrected", "broken"):
        assert key in rows[1]
    # the recording reproduces it, also without --readout (the recording's choice counts)
    again = json.loads(runner.invoke(app, ["align", str(out), "--readout", "-f", "json"]).stdout)
    assert again["readout"] == rows
    assert json.loads(runner.invoke(app, ["align", str(out), "-f", "json"]).stdout)["readout"] == rows
    table = runner.invoke(app, ["align", str(out), "--readout"]).stdout
    assert "last-stage readout" in table


def test_align_readout_on_a_recording_without_it_is_one_line_error(tmp_path):
    runner = CliRunner()
    out = tmp_path / "plain.h5"
    assert runner.invoke(app, ["record", MODEL, "--data", DATA, "--limit", "16", "--out", str(out)]).exit_code == 0
    result = runner.invoke(app, ["align", str(out), "--readout"])
    assert result.exit_code == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "--readout" in result.stderr
