"""Loss and accuracy of a model on a data set: the baseline every other figure is compared with."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from resprobe.losses import LossFn, is_class_labels  # noqa: F401  (is_class_labels: re-exported)
from resprobe.runtime import Runtime


@dataclass
class EvalResult:
    """``loss`` mean per-sample cross-entropy, ``acc`` top-1 and ``top5`` top-5 in [0, 1]."""

    n: int
    loss: float
    acc: float | None  # None: targets that are not class indices (a custom loss)
    top5: float | None

    def to_dict(self) -> dict:
        return asdict(self)


class Tally:
    """Sums of per-sample loss and hits, accumulated in float64. ``loss_fn``: per-sample losses
    (default cross-entropy); accuracy is counted only for class-index targets."""

    def __init__(self) -> None:
        self.n = 0
        self.loss = 0.0
        self.hits = 0
        self.hits5 = 0
        self.num_classes: int | None = None
        self.unscored = False  # targets that are not class indices were seen: acc and top5 are None

    def add(self, logits: Tensor, labels: Tensor, loss_fn: LossFn | None = None) -> Tensor:
        logits = logits.float()
        if loss_fn is not None:
            losses = loss_fn(logits, labels).float()
            if not is_class_labels(labels, logits):  # no classes: loss only, accuracy undefined
                self.unscored = True
                self.n += len(losses)
                self.loss += float(losses.double().sum())
                return losses
        else:
            losses = F.cross_entropy(logits, labels, reduction="none")
        self.n += len(labels)
        self.loss += float(losses.double().sum())
        self.hits += int((logits.argmax(1) == labels).sum())
        self.num_classes = logits.shape[1]
        if self.num_classes >= 5:
            top5 = logits.topk(5, dim=1).indices
            self.hits5 += int((top5 == labels[:, None]).any(1).sum())
        return losses

    def totals(self) -> tuple[float, float, float, float, float]:
        return (self.n, self.loss, self.hits, self.hits5, self.num_classes or 0)

    def set_totals(self, totals: tuple[float, ...]) -> None:
        self.n, self.loss, self.hits, self.hits5 = int(totals[0]), float(totals[1]), int(totals[2]), int(totals[3])
        self.num_classes = int(totals[4]) or None

    def result(self) -> EvalResult:
        n = max(self.n, 1)
        if self.unscored:
            return EvalResult(self.n, self.loss / n, None, None)  # type: ignore[arg-type]
        top5 = self.hits5 / n if (self.num_classes or 0) >= 5 else None
        return EvalResult(self.n, self.loss / n, self.hits / n, top5)


def reduce_tallies(tallies: list[Tally]) -> None:
    """In a run of several processes (torchrun), make each tally the sum over all ranks (one float64
    all-reduce for all of them, so every rank holds the same numbers); nothing in a run of one."""
    from resprobe.distributed import all_reduce_sums, is_distributed

    if not is_distributed():
        return
    # Per tally: n, loss, hits, hits5, and the class count with the number of ranks that saw one (a
    # rank without batches knows none; the others all know the model's), so their ratio is the count.
    values = [v for t in tallies for v in (*t.totals()[:4], t.num_classes or 0, 1 if t.num_classes else 0)]
    sums = all_reduce_sums(values)
    for i, tally in enumerate(tallies):
        n, loss, hits, hits5, classes, knowing = sums[6 * i:6 * i + 6]
        tally.set_totals((n, loss, hits, hits5, round(classes / knowing) if knowing else 0))


@torch.no_grad()
def evaluate(
    model: nn.Module | Callable[[Tensor], Tensor],
    loader: Iterable,
    runtime: Runtime,
    progress: Callable[[int], None] | None = None,
    loss_fn: LossFn | None = None,
) -> EvalResult:
    """Mean cross-entropy (or ``loss_fn``'s per-sample loss), top-1 and top-5 accuracy of ``model`` (in
    eval mode) over ``loader``."""
    tally = Tally()
    for images, labels, _ in loader:
        images, labels = runtime.batch(images), labels.to(runtime.device)
        with runtime.compute():
            logits = model(images)
        tally.add(logits, labels, loss_fn)
        if progress:
            progress(len(labels))
    reduce_tallies([tally])  # torchrun: each rank evaluated its share of the batches
    return tally.result()


BORDERLINE_MARGIN = 0.10  # docs/reference.md: margin p_y − max_{k≠y} p_k in (−0.10, 0.10)


def borderline_mask(logits: Tensor, labels: Tensor, margin: float = BORDERLINE_MARGIN) -> Tensor:
    """Samples whose ``p_y − max_{k≠y} p_k`` lies in (−margin, margin) (docs/reference.md "Borderline")."""
    probs = torch.softmax(logits.float(), dim=1)
    p_true = probs.gather(1, labels[:, None]).squeeze(1)
    others = probs.scatter(1, labels[:, None], float("-inf"))
    gap = p_true - others.max(dim=1).values
    return (gap > -margin) & (gap < margin)
