"""``eval`` for language models: mean next-token NLL per scored token, perplexity, and the protocol
(DESIGN §8 "Loss"). Sums are kept in float64 and all-reduced under torchrun."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from resprobe.models.causal_lm import perplexity
from resprobe.recording.lm_recorder import window_losses


@torch.no_grad()
def evaluate_lm(model: nn.Module, loader: Iterable, device: torch.device,
                progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """``{loss, perplexity, n_tokens, n_windows}`` of ``model`` over batches of windows."""
    from resprobe.distributed import all_reduce_sums, is_distributed

    model.eval()
    total, tokens, windows = 0.0, 0, 0
    for input_ids, first, _ in loader:
        input_ids, first = input_ids.to(device), first.to(device)
        logits = model(input_ids=input_ids, use_cache=False).logits
        losses, counts = window_losses(logits, input_ids, first)
        total += float(losses.double().sum())
        tokens += int(counts.sum())
        windows += len(input_ids)
        if progress:
            progress(len(input_ids))
    if is_distributed():  # each rank evaluated its share of the windows
        total, tokens, windows = all_reduce_sums([total, tokens, windows])
        tokens, windows = int(round(tokens)), int(round(windows))
    loss = total / tokens if tokens else None
    return {"loss": loss, "perplexity": perplexity(loss), "n_tokens": tokens, "n_windows": windows}


def eval_payload(probe: Any, data: str, limit: int | None, seed: int, batch_size: int,
                 progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """The ``eval`` JSON for a language model: ``{model, data, n, loss, perplexity, n_tokens, protocol}``."""
    from resprobe.distributed import shard_source

    source = probe.data(data, limit, seed)
    loader = probe.loader(shard_source(source, batch_size), batch_size)  # torchrun: this rank's windows
    result = evaluate_lm(probe.model, loader, probe.runtime.device, progress)
    return {"model": probe.loaded.spec, "checkpoint": None, "data": data, "n": result["n_windows"],
            "loss": result["loss"], "perplexity": result["perplexity"], "n_tokens": result["n_tokens"],
            "precision": probe.loaded.precision, "protocol": probe.protocol}


def blocks_payload(probe: Any) -> dict[str, Any]:
    """The ``blocks`` JSON for a language model."""
    from resprobe.models.blocks import count_params

    return {"model": probe.loaded.spec, "checkpoint": None, "params": count_params(probe.model),
            "layers": probe.anatomy.layers_name, "granularity": probe.granularity,
            "blocks": [b.to_dict() for b in probe.anatomy.blocks]}
