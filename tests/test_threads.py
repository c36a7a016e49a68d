"""The threaded paths, run with the CPU's default thread count (the rest of the suite forces one thread:
tests/conftest.py). ``ablate`` on the CPU runs the removals' suffixes side by side in threads; a model
written by ``share`` has one shared block run by several iterations, and threads must not mix them
(issue 22 item 1)."""

from __future__ import annotations


import pytest
import torch
from torch import nn

import tinymodels
from conftest import DATA, MODEL
from resprobe.ablate import AblateOptions, run_ablation
from resprobe.ablate_engine import AblationEngine, evaluate_pass, lesion_variant
from resprobe.models.blocks import discover_blocks, replaced_blocks
from resprobe.evaluate import EvalResult, Tally
from resprobe.runtime import make_runtime
from resprobe.share import ShareOptions, share_stages

pytestmark = pytest.mark.default_threads

CPU = make_runtime("cpu")


@pytest.fixture
def thread_pools(monkeypatch) -> list[int]:
    """The worker count of every threaded suffix run (proof that the threaded path was taken)."""
    pools: list[int] = []
    original = AblationEngine._suffixes_in_threads

    def counted(self, images, jobs, cache, workers, *args, **kwargs):
        pools.append(workers)
        return original(self, images, jobs, cache, workers, *args, **kwargs)

    monkeypatch.setattr(AblationEngine, "_suffixes_in_threads", counted)
    return pools


def naive(model: nn.Module, data: list, blocks=()) -> EvalResult:
    """The reference: the model's own full forward, on the main thread, with the blocks removed."""
    tally = Tally()
    with torch.no_grad(), replaced_blocks(list(blocks)):
        for x, y in data:
            tally.add(model(x), y)
    return tally.result()


def batches(n: int = 24, split: int = 12) -> list:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 5, (n,), generator=g)
    return [(x[:split], y[:split]), (x[split:], y[split:])]


def shared_tiny() -> nn.Module:
    model = tinymodels.timm_basic()
    with torch.no_grad():  # a classifier of real size, so that removals change the loss
        model.fc.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(7))
    share_stages(model, discover_blocks(model, (3, 32, 32)), ShareOptions(stages=[0, 1], lora_rank=2,
                                                                           allow_single_block=True))
    return model.eval()


def test_the_suite_runs_this_module_with_several_threads():
    assert torch.get_num_threads() >= 2


@pytest.mark.parametrize("make", [shared_tiny, lambda: tinymodels.timm_basic().eval()], ids=["shared", "plain"])
def test_threaded_removals_equal_naive_reevaluation(make, thread_pools):
    model = make()
    anatomy = discover_blocks(model, (3, 32, 32))
    data = batches()
    positions = list(range(len(anatomy.blocks)))
    references = [naive(model, data, [anatomy.blocks[p]]) for p in positions]
    engine = AblationEngine(model, anatomy, CPU, data)
    result = evaluate_pass(engine, [lesion_variant(anatomy, [p]) for p in positions])
    assert thread_pools and min(thread_pools) >= 2  # every batch ran its suffixes in threads
    assert result.base.loss == pytest.approx(naive(model, data).loss, abs=1e-5)
    for p, r, reference in zip(positions, result.variants, references):
        assert r.loss == pytest.approx(reference.loss, abs=1e-5), anatomy.blocks[p].name
        assert r.acc == reference.acc
    assert max(abs(r.loss - result.base.loss) for r in result.variants) > 1e-3  # removals matter


def test_ablate_of_a_shared_checkpoint_on_default_threads(tmp_path, run, thread_pools):
    """The issue's reproduction: ``share`` the shipped model's stage 0, then ``ablate`` it on the CPU."""
    from resprobe.probe import open_probe

    shared = tmp_path / "s.pt"
    run("share", MODEL, "--stages", "0", "--out", shared, "--data", DATA, "--limit", "32", "-q")
    probe = open_probe(str(shared), device="cpu")
    loader = probe.loader(probe.data(DATA, limit=64), batch_size=32)
    report = run_ablation(probe, loader, AblateOptions())
    assert thread_pools and min(thread_pools) >= 2
    data = [(x, y) for x, y, *_ in loader]
    for removal in report.blocks:
        reference = naive(probe.model, data, [probe.anatomy[removal.name]])
        assert removal.loss == pytest.approx(reference.loss, abs=1e-5), removal.name
        assert removal.acc == reference.acc
