"""The naive way to rank ResNet blocks by removal: for each identity block, patch it to return its
input and re-evaluate the whole model on all the data. Plain PyTorch, no resprobe (the floor that
``resprobe ablate`` is compared with in ablate_cpu.py).

    python benchmarks/naive_ablate.py DATA.npz WEIGHTS.pt [--batch-size 100] [--mean a,b,c --std a,b,c]

Prints JSON: {baseline: {loss, acc}, blocks: [{name, loss, acc}]}.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from torch.nn import functional as F
from torchvision.models import resnet50


def load_images(path: str, mean: list[float], std: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(path) as f:
        images = torch.from_numpy(f["images"]).permute(0, 3, 1, 2).float().div(255.0)
        labels = torch.from_numpy(f["labels"].astype(np.int64))
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (images - mean_t) / std_t, labels


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> dict:
    loss, hits = 0.0, 0
    for start in range(0, len(labels), batch_size):
        x, y = images[start:start + batch_size], labels[start:start + batch_size]
        logits = model(x)
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        hits += int((logits.argmax(1) == y).sum())
    return {"loss": loss / len(labels), "acc": hits / len(labels)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data")
    parser.add_argument("weights")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--mean", default="0.4914,0.4822,0.4465")
    parser.add_argument("--std", default="0.2470,0.2435,0.2616")
    args = parser.parse_args()
    images, labels = load_images(args.data, [float(v) for v in args.mean.split(",")],
                                 [float(v) for v in args.std.split(",")])
    model = resnet50(num_classes=10)
    model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    model.eval()
    report = {"baseline": evaluate(model, images, labels, args.batch_size), "blocks": []}
    for layer_name in ("layer1", "layer2", "layer3", "layer4"):
        for index, block in enumerate(getattr(model, layer_name)):
            if index == 0:  # the transition block of each stage
                continue
            block.forward = lambda x: x  # removed: an identity block's lesion is its input
            report["blocks"].append({"name": f"{layer_name}.{index}", **evaluate(model, images, labels, args.batch_size)})
            del block.forward
    print(json.dumps(report))


if __name__ == "__main__":
    main()
