"""Preprocessing: the model's evaluation transform, overrides, and the checks on them."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from resprobe.errors import BadValue
from resprobe.models.loading import LoadedModel

if TYPE_CHECKING:  # annotations only: no import cycle
    from resprobe.data.datasets import DataSource


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """What a model expects of its input. ``resize`` names whose eval transform resizes images that
    are not already ``input_size``: ``timm`` (timm's ``create_transform``) or ``torchvision``."""

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    crop_mode: str = "center"
    resize: str = "torchvision"
    resize_size: int | None = None  # torchvision weights' own resize size, when known

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for key in ("input_size", "mean", "std"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)


def default_preprocessing(loaded: LoadedModel) -> Preprocessing:
    """The model's own preprocessing: a resprobe checkpoint's record, timm's resolved data config,
    torchvision's weights transforms, or torchvision's defaults."""
    if loaded.preprocessing:
        return Preprocessing.from_dict(loaded.preprocessing)
    weights = loaded.torchvision_weights
    if weights is not None:
        t = weights.transforms()
        crop = int(t.crop_size[0])
        resize = int(t.resize_size[0])
        return Preprocessing((3, crop, crop), tuple(t.mean), tuple(t.std), crop / resize,
                             t.interpolation.value, "center", "torchvision", resize)
    model = loaded.model
    if loaded.source in ("timm", "hf-hub") or getattr(model, "pretrained_cfg", None):
        from timm.data import resolve_data_config

        cfg = resolve_data_config(model=model)
        return Preprocessing(tuple(cfg["input_size"]), tuple(cfg["mean"]), tuple(cfg["std"]),
                             float(cfg.get("crop_pct", 0.875)), str(cfg.get("interpolation", "bilinear")),
                             str(cfg.get("crop_mode", "center")), "timm")
    return Preprocessing()


def parse_input_size(text: str) -> tuple[int, int, int]:
    """``N`` or ``HxW`` → ``(3, H, W)``."""
    try:
        parts = [int(p) for p in text.lower().replace("×", "x").split("x")]
    except ValueError:
        raise BadValue(f"--input-size {text!r}: expected N or HxW, e.g. 32 or 224x192") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise BadValue(f"--input-size {text!r}: expected N or HxW with positive sizes")
    return (3, parts[0], parts[1])


def parse_triplet(text: str, option: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise BadValue(f"{option} {text!r}: expected three comma-separated numbers, e.g. 0.5,0.5,0.5") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise BadValue(f"{option} {text!r}: expected three finite comma-separated numbers")
    if option == "--std" and min(values) <= 0:
        raise BadValue(f"--std {text!r}: every value must be positive")
    return values


def check_unit_scale(given: Sequence[tuple[str, str, tuple[float, ...]]]) -> None:
    """``(option, text, values)`` of ``--mean`` and ``--std``: values are on the [0, 1] scale, as images
    are scaled to [0, 1] before they are normalized, so 0-255 statistics would be wrong. One error names
    every offending option: all values above 1 get their values divided by 255; values mixing the
    scales (some at most 1, some above) are said to, with no division suggested."""
    whole = [(option, text, values) for option, text, values in given if min(values) > 1]
    mixed = [(option, text) for option, text, values in given if min(values) <= 1 < max(values)]
    problems = []
    if whole:
        named = " and ".join(f"{option} {text}" for option, text, _ in whole)
        scaled = " ".join(f"{option} " + ",".join(f"{v / 255:.4f}" for v in values) for option, _, values in whole)
        problems.append(f"{named} {'are' if len(whole) > 1 else 'is'} on the 0-255 scale, but values are on the "
                        f"[0, 1] scale (images are scaled to [0, 1] before normalizing); divided by 255 that is "
                        f"{scaled}")
    for option, text in mixed:
        problems.append(f"{option} {text} mixes scales (some values at most 1, some above 1): give every value on "
                        "the [0, 1] scale images are normalized on")
    if problems:
        raise BadValue("; ".join(problems))


_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")


def override_preprocessing(
    pre: Preprocessing,
    input_size: str | None = None,
    mean: str | None = None,
    std: str | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
) -> Preprocessing:
    """Apply the command line's ``--input-size --mean --std --crop-pct --interpolation``."""
    changes: dict[str, Any] = {}
    if input_size:
        changes["input_size"] = parse_input_size(input_size)
        changes["resize_size"] = None
    if mean:
        changes["mean"] = parse_triplet(mean, "--mean")
    if std:
        changes["std"] = parse_triplet(std, "--std")
    check_unit_scale([(f"--{key}", text, changes[key]) for key, text in (("mean", mean), ("std", std)) if text])
    if crop_pct is not None:
        if not 0 < crop_pct <= 1:
            raise BadValue(f"--crop-pct {crop_pct}: must be in (0, 1]")
        changes["crop_pct"] = crop_pct
        changes["resize_size"] = None
    if interpolation:
        if interpolation not in _INTERPOLATIONS:
            raise BadValue(f"--interpolation {interpolation!r}: choose one of {', '.join(_INTERPOLATIONS)}")
        changes["interpolation"] = interpolation
    return replace(pre, **changes) if changes else pre


def contradicted_preprocessing(recorded: Preprocessing, used: Preprocessing, input_size: str | None = None,
                               mean: str | None = None, std: str | None = None, crop_pct: float | None = None,
                               interpolation: str | None = None) -> list[tuple[str, str]]:
    """The options given that differ from a checkpoint's recorded preprocessing, as pairs of (what the
    checkpoint records, what was given): e.g. ``("32×32 inputs", "--input-size 64")``. Statistics count
    as equal to 4 decimals, as they are usually typed."""

    def close(a: Sequence[float], b: Sequence[float]) -> bool:
        return len(a) == len(b) and all(math.isclose(x, y, rel_tol=0, abs_tol=5e-4) for x, y in zip(a, b))

    def size(shape: Sequence[int]) -> str:
        return f"{shape[1]}×{shape[2]}"

    found = []
    if input_size and tuple(used.input_size) != tuple(recorded.input_size):
        _, h, w = used.input_size
        found.append((f"{size(recorded.input_size)} inputs", f"--input-size {h if h == w else f'{h}x{w}'}"))
    if mean and not close(used.mean, recorded.mean):
        found.append((f"mean {_triple(recorded.mean)}", f"--mean {_triple(used.mean)}"))
    if std and not close(used.std, recorded.std):
        found.append((f"std {_triple(recorded.std)}", f"--std {_triple(used.std)}"))
    if crop_pct is not None and not close([used.crop_pct], [recorded.crop_pct]):
        found.append((f"crop_pct {recorded.crop_pct:g}", f"--crop-pct {used.crop_pct:g}"))
    if interpolation and used.interpolation != recorded.interpolation:
        found.append((f"{recorded.interpolation} interpolation", f"--interpolation {used.interpolation}"))
    return found


def contradiction_warning(name: str, found: list[tuple[str, str]]) -> str | None:
    """One warning for every option that contradicts checkpoint ``name``'s recorded preprocessing."""
    if not found:
        return None
    recorded, given = (" and ".join(", ".join(part) for part in (parts[:-1], parts[-1:]) if part)
                       for parts in zip(*found))
    one = len(found) == 1
    return (f"{name} was made with {recorded}; {given} {'overrides that' if one else 'override those'} (the "
            f"figures may differ from the model's own: leave {'it' if one else 'them'} out to use what the checkpoint "
            "records)")


def _resize_transform(pre: Preprocessing) -> Callable[[Any], Tensor]:
    """The evaluation transform for images that are not already of the input size (PIL → tensor)."""
    _, h, w = pre.input_size
    if pre.resize == "timm":
        from timm.data import create_transform

        return create_transform(input_size=pre.input_size, is_training=False, interpolation=pre.interpolation,
                                mean=pre.mean, std=pre.std, crop_pct=pre.crop_pct, crop_mode=pre.crop_mode)
    from torchvision import transforms as T

    size = resize_side(pre)
    return T.Compose([
        T.Resize(size, interpolation=T.InterpolationMode(pre.interpolation), antialias=True),
        T.CenterCrop((h, w)),
        T.ToTensor(),
        T.Normalize(pre.mean, pre.std),
    ])


class ImageTransform:
    """PIL image → normalized tensor; resized only when it is not already of the input size."""

    def __init__(self, pre: Preprocessing):
        from torchvision import transforms as T

        self.pre = pre
        self.size = (pre.input_size[2], pre.input_size[1])  # PIL's (width, height)
        self.plain = T.Compose([T.ToTensor(), T.Normalize(pre.mean, pre.std)])
        self.resized = _resize_transform(pre)

    def __call__(self, image: Any) -> Tensor:
        image = image.convert("RGB")
        return self.plain(image) if image.size == self.size else self.resized(image)


def resize_side(pre: Preprocessing) -> int:
    """The side the shorter image side is resized to before the center crop (timm's and torchvision's
    evaluation transforms both resize to ⌊size / crop_pct⌋ unless the weights name their own size)."""
    _, h, w = pre.input_size
    return pre.resize_size or int(math.floor(min(h, w) / pre.crop_pct))


MAX_UPSCALE = 2.0


def upscale_warning(source: DataSource, pre: Preprocessing) -> str | None:
    """A warning when the images (judged by the first one) are upscaled more than 2× to the input size:
    e.g. 32×32 CIFAR images given to a model whose default input is 224 — most likely a model trained
    on 32×32 images whose checkpoint does not say so. Arrays, never resized, are warned about when the
    input size is more than 2× theirs (the model then runs on inputs far smaller than its own)."""
    if source.in_memory:
        return _small_arrays_warning(source, pre)
    if source.image_size is None:
        return None
    h, w = source.image_size
    _, size_h, size_w = pre.input_size
    if (h, w) == (size_h, size_w) or min(h, w) < 1:
        return None  # only normalized
    side = resize_side(pre)
    factor = side / min(h, w)
    if factor <= MAX_UPSCALE:
        return None
    return (f"the images are {h}×{w} (the first of {source.spec}) but the model's input size is {size_h}×{size_w}: "
            f"they are upscaled {factor:.1f}× (resized to {side}, center-cropped to {size_h}×{size_w}); if the "
            f"model was trained on {h}×{w} images, pass --input-size {h if h == w else f'{h}x{w}'}")


def _array_size(source: DataSource) -> tuple[int, int] | None:
    """(H, W) of in-memory arrays (all of one size), or None when there are none."""
    return tuple(int(v) for v in source.dataset[0][0].shape[-2:]) if len(source) else None  # type: ignore[return-value]


def _small_arrays_warning(source: DataSource, pre: Preprocessing) -> str | None:
    size = _array_size(source)
    _, size_h, size_w = pre.input_size
    if size is None or size == (size_h, size_w) or min(size) < 1:
        return None
    h, w = size
    factor = min(size_h, size_w) / min(h, w)
    if factor <= MAX_UPSCALE:
        return None  # the preprocessing note names the model's size
    return (f"the arrays of {source.spec} are {h}×{w} but the model's input size is {size_h}×{size_w} ({factor:.1f}× "
            f"larger): arrays are never resized, so the model runs on {h}×{w} inputs; if it was trained on {h}×{w} "
            f"images, pass --input-size {h if h == w else f'{h}x{w}'}, else resize the arrays to {size_h}×{size_w}")


def describe_preprocessing(source: DataSource, pre: Preprocessing) -> str:
    """One line saying what the data goes through, for stderr."""
    stats = f"mean {_triple(pre.mean)}, std {_triple(pre.std)}"
    if source.in_memory:
        _, h, w = pre.input_size
        size = _array_size(source) or (h, w)
        other = f" (the model's input size is {h}×{w})" if size != (h, w) else ""
        return (f"preprocessing of {source.spec}: {size[0]}×{size[1]} arrays scaled to [0, 1] and normalized ({stats}), "
                f"never resized{other}")
    _, h, w = pre.input_size
    resize = (f"images not {h}×{w} resized to {resize_side(pre)} ({pre.interpolation}) and center-cropped to "
              f"{h}×{w}")
    if source.image_size is not None and source.image_size == (h, w):
        resize = f"images of {h}×{w} only normalized (others resized to {resize_side(pre)} and center-cropped)"
    return f"preprocessing of {source.spec}: {resize}; {stats}"


def _triple(values: Sequence[float]) -> str:
    return ",".join(f"{v:.4g}" for v in values)


def normalize(images: Tensor, pre: Preprocessing) -> Tensor:
    mean = torch.tensor(pre.mean, dtype=images.dtype).view(1, -1, 1, 1)
    std = torch.tensor(pre.std, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean) / std
