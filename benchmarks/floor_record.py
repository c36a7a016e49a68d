"""The floor for ``resprobe record``: forward + backward to the input, no weight gradients, nothing else.

    python benchmarks/floor_record.py DATA.npz [--batch-size 100] [--checkpoint WEIGHTS.pt]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--checkpoint", help="a state dict to load (as record --checkpoint does)")
    args = parser.parse_args()
    model = torchvision.models.get_model("resnet50", num_classes=10).eval().requires_grad_(False)
    if args.checkpoint:
        model.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
    with np.load(args.data) as f:
        images, labels = f["images"], f["labels"]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    y = torch.from_numpy(labels).long()
    for start in range(0, len(x), args.batch_size):
        batch = x[start : start + args.batch_size].clone().requires_grad_(True)
        loss = F.cross_entropy(model(batch), y[start : start + args.batch_size], reduction="sum")
        torch.autograd.grad(loss, batch)


if __name__ == "__main__":
    main()
