"""Last-stage readout (paper §4.3, Fig. 5): the model's own head applied after each block of the last
stage — loss, accuracy and entropy after each block, and how many borderline examples each block
corrects or breaks.

A borderline example has margin ``p_y − max_{k≠y} p_k`` on the intact model in (−0.10, 0.10)
(docs/reference.md). A block *corrects* one when the readout after it is right and the one before it
wrong, and *breaks* one the other way round. The first block of the stage has no readout before it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from resprobe.evaluate import BORDERLINE_MARGIN, borderline_mask
from resprobe.recording.recorder import Recorded

BORDERLINE = BORDERLINE_MARGIN


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def summarize_readout(recorded: Recorded) -> list[dict[str, Any]]:
    names = [n for n in recorded.block_names if n in recorded.readout]
    if not names:
        return []
    labels = recorded.label
    # The readout after the last block is the model's own output.
    border = borderline_mask(torch.from_numpy(recorded.readout[names[-1]]), torch.from_numpy(labels)).numpy()
    rows: list[dict[str, Any]] = []
    previous_right: np.ndarray | None = None
    for name in names:
        probs = softmax(recorded.readout[name])
        rows_idx = np.arange(len(labels))
        loss = -np.log(np.clip(probs[rows_idx, labels], 1e-300, None))
        right = probs.argmax(1) == labels
        entropy = -(probs * np.log(np.clip(probs, 1e-300, None))).sum(1)
        row = {"name": name, "loss": float(loss.mean()), "acc": float(right.mean()),
               "entropy": float(entropy.mean()), "n_borderline": int(border.sum()),
               "borderline_acc": float(right[border].mean()) if border.any() else None,
               "corrected": None, "broken": None}
        if previous_right is not None:
            row["corrected"] = int((border & right & ~previous_right).sum())
            row["broken"] = int((border & ~right & previous_right).sum())
        rows.append(row)
        previous_right = right
    return rows
