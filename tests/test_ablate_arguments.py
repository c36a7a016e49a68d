"""ablate of models whose blocks are called with more than their input (issue 22 item 4): the engine
gives each block again what the model passed it (EVA-02's ``rope=``, masks), against naive full
re-evaluations written independently."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from resprobe.ablate_curves import greedy_curve
from resprobe.ablate_engine import AblationEngine, evaluate_pass, lesion_variant, unrolled
from resprobe.evaluate import EvalResult, Tally
from resprobe.models.blocks import discover_blocks, replaced_blocks
from resprobe.runtime import make_runtime

CPU = make_runtime("cpu")


def batches(n: int = 20, size: int = 32, split: int = 12) -> list:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, 5, (n,), generator=g)
    return [(x[:split], y[:split]), (x[split:], y[split:])]


def naive(model: nn.Module, data: list, blocks, fns) -> EvalResult:
    """The model's own full forward with the blocks patched by ``fns``."""
    tally = Tally()
    with torch.no_grad(), replaced_blocks(list(blocks), fns):
        for x, y in data:
            tally.add(model(x), y)
    return tally.result()


# --------------------------------------------------------------------------------------------------
# Custom models


class GatedBlock(nn.Module):
    """A block that needs a positional gate and a keyword scale besides its input."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, gate, *, scale):
        return x + torch.tanh(self.conv(x)) * gate * scale


class ThreeBlockNet(nn.Module):
    """A stem, three blocks of class ``block`` that the subclass's forward calls, a known head."""

    def __init__(self, block: type, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.ModuleList([block(8) for _ in range(3)])
        self.fc = nn.Linear(8, 5)

    def forward_head(self, h):
        return self.fc(h.mean((2, 3)))


class GatedNet(ThreeBlockNet):
    """Each block gets a gate and a scale computed from the image (so no default could stand in)."""

    def __init__(self):
        super().__init__(GatedBlock, 5)

    def extras(self, x, i):
        gate = torch.sigmoid(x.mean((1, 2, 3)) * 40)[:, None, None, None]
        return gate, 1.5 * (i + 1)

    def run(self, x, skip=()):
        """The model by hand, with the blocks at ``skip`` removed: the independent reference."""
        h = self.stem(x)
        for i, block in enumerate(self.body):
            if i not in skip:
                gate, scale = self.extras(x, i)
                h = block(h, gate, scale=scale)
        return self.forward_head(h)

    def forward(self, x):
        return self.run(x)


def by_hand(fn, data) -> EvalResult:
    tally = Tally()
    with torch.no_grad():
        for x, y in data:
            tally.add(fn(x), y)
    return tally.result()


@pytest.mark.parametrize("threads", [2, 1], ids=["suffixes-in-threads", "sequential"])
def test_blocks_called_with_extra_arguments_get_them_again(threads, monkeypatch):
    model = GatedNet().eval()
    anatomy = discover_blocks(model, (3, 16, 16), ["body.*"])
    data = batches(size=16)
    engine = AblationEngine(model, anatomy, CPU, data)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert engine.fast
    singles = evaluate_pass(engine, [lesion_variant(anatomy, [p]) for p in range(3)])
    for p, r in enumerate(singles.variants):
        reference = by_hand(lambda x, p=p: model.run(x, skip={p}), data)
        assert r.loss == pytest.approx(reference.loss, abs=1e-6) and r.acc == reference.acc
    # A greedy step: the base pass runs with a block removed (patched), the suffixes from its cache.
    curve = greedy_curve(engine, [0, 1, 2], 2, "loss", singles.base, singles.variants)
    reference = by_hand(lambda x: model.run(x, skip={anatomy.position(n) for n in curve[2].removed}), data)
    assert curve[2].loss == pytest.approx(reference.loss, abs=1e-6)


def tiny_eva() -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("eva02_tiny_patch14_224", img_size=32, patch_size=4, num_classes=5, depth=4,
                              embed_dim=48, num_heads=2).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random norms and a classifier of real size: every block matters
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.copy_(torch.rand(module.weight.shape, generator=g) * 1.5 + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=g) * 0.3)
        model.head.weight.normal_(0, 1.0, generator=g)
    return model


def test_eva_blocks_get_their_rotary_embedding_in_removals_and_unrolling():
    model = tiny_eva()
    anatomy = discover_blocks(model, (3, 32, 32), ["blocks.*"])
    data = batches(n=16, split=8)
    engine = AblationEngine(model, anatomy, CPU, data)
    assert engine.fast
    last = len(anatomy.blocks) - 1
    variants = [lesion_variant(anatomy, [p]) for p in range(len(anatomy.blocks))]
    variants.append({0: unrolled(anatomy.blocks[0], 1)})
    result = evaluate_pass(engine, variants)

    def skipping(p):  # the model's own forward, block p an identity map: independent of Block.lesion
        def fn(h, *_args, **_kwargs):
            return h
        return fn

    for p in range(len(anatomy.blocks)):
        reference = naive(model, data, [anatomy.blocks[p]], [skipping(p)])
        assert result.variants[p].loss == pytest.approx(reference.loss, abs=1e-6), anatomy.blocks[p].name
    forward = type(anatomy.blocks[0].module).forward
    module = anatomy.blocks[0].module

    def twice(h, *args, **kwargs):
        return forward(module, forward(module, h, *args, **kwargs), *args, **kwargs)

    reference = naive(model, data, [anatomy.blocks[0]], [twice])
    assert result.variants[-1].loss == pytest.approx(reference.loss, abs=1e-6)
    assert abs(result.variants[0].loss - result.base.loss) > 1e-3 and last > 0


class CountingBlock(nn.Module):
    """A block whose keyword argument is a state it changes (a cache it appends to): what it got in the
    model's forward cannot simply be given again."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, *, memory: list):
        memory.append(None)
        return x + torch.tanh(self.conv(x)) * len(memory)


class CountingNet(ThreeBlockNet):
    def __init__(self):
        super().__init__(CountingBlock, 6)

    def forward(self, x):
        h, memory = self.stem(x), []
        for block in self.body:
            h = block(h, memory=memory)
        return self.forward_head(h)


def test_blocks_whose_arguments_cannot_be_given_again_get_full_forwards():
    model = CountingNet().eval()
    anatomy = discover_blocks(model, (3, 16, 16), ["body.*"])
    assert not anatomy.can_run_suffix  # running on from block 0 did not reproduce the logits
    data = batches(size=16)
    engine = AblationEngine(model, anatomy, CPU, data)
    assert not engine.fast
    result = evaluate_pass(engine, [lesion_variant(anatomy, [p]) for p in range(3)])

    def without(x, p):
        h, memory = model.stem(x), []
        for i, block in enumerate(model.body):
            h = h if i == p else block(h, memory=memory)
        return model.forward_head(h)

    for p, r in enumerate(result.variants):
        reference = by_hand(lambda x, p=p: without(x, p), data)
        assert r.loss == pytest.approx(reference.loss, abs=1e-6)
