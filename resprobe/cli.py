"""The ``resprobe`` command line: parse options, call the library, render. Nothing else.

Reports go to stdout; progress, warnings and errors to stderr. Exit codes: 0 success, 1 an error
resprobe detected (one line on stderr; ``--debug`` for the traceback), 2 a usage error raised by
the argument parser, 130 interrupted.
"""

from __future__ import annotations

import contextlib
import json
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from resprobe import __version__
from resprobe.errors import BadValue, ResprobeError

app = typer.Typer(
    name="resprobe",
    help="Probe trained residual networks: does each block refine along the negative loss gradient "
    "(align), which blocks can go (ablate), can a stage become one shared iterated block (share)?",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

stderr = Console(stderr=True, highlight=False, soft_wrap=True)

# --------------------------------------------------------------------------------------------------
# Options shared by the commands (Annotated aliases keep each signature readable)

Model = Annotated[str, typer.Argument(help="torchvision:NAME[:WEIGHTS] | timm:NAME | NAME | hf-hub:ORG/NAME | "
                                      "checkpoint PATH | package.module:callable", show_default=False)]
Format = Annotated[str, typer.Option("--format", "-f", help="Report format: table, json or csv.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or notes on stderr.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")]
Checkpoint = Annotated[Optional[str], typer.Option("--checkpoint", help="Weights file: state dict, .safetensors, "
                                                   "timm/torchvision training checkpoint.", show_default=False)]
Pretrained = Annotated[bool, typer.Option("--pretrained", help="timm/torchvision pretrained weights from the "
                                          "local caches (never downloaded).")]
NumClasses = Annotated[Optional[int], typer.Option("--num-classes", help="Classifier size (default: from the "
                                                   "checkpoint's classifier).", show_default=False)]
ModelKwargs = Annotated[Optional[str], typer.Option("--model-kwargs", help="JSON of extra model arguments, e.g. "
                                                    "'{\"layers\": [1,1,1,1]}'.", show_default=False)]
Ema = Annotated[bool, typer.Option("--ema", help="Load the checkpoint's EMA weights.")]
Trust = Annotated[bool, typer.Option("--trust-checkpoint", help="Allow unpickling arbitrary objects (runs code "
                                     "from the file: only for files you trust).")]
BlocksGlob = Annotated[Optional[str], typer.Option("--blocks", help="Comma-separated globs naming the residual "
                                                   "blocks of a custom model.", show_default=False)]
InputSize = Annotated[Optional[str], typer.Option("--input-size", help="N or HxW (default: the model's).",
                                                  show_default=False)]
Mean = Annotated[Optional[str], typer.Option("--mean", help="a,b,c normalization mean.", show_default=False)]
Std = Annotated[Optional[str], typer.Option("--std", help="a,b,c normalization std.", show_default=False)]
CropPct = Annotated[Optional[float], typer.Option("--crop-pct", help="Center-crop fraction when resizing.",
                                                  show_default=False)]
Interpolation = Annotated[Optional[str], typer.Option("--interpolation", help="bilinear, bicubic, ... when "
                                                      "resizing.", show_default=False)]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
Precision = Annotated[str, typer.Option("--precision", help="fp32 (TF32 off), tf32, bf16 or fp16.")]
Data = Annotated[Optional[str], typer.Option("--data", help="Image folder | cifar10:DIR[:train|test] | "
                                             "cifar100:DIR[:split] | arrays .npz/.h5 | synthetic[:N].",
                                             show_default=False)]
Limit = Annotated[Optional[int], typer.Option("--limit", help="Use N samples, chosen reproducibly by --seed.",
                                              show_default=False)]
Seed = Annotated[int, typer.Option("--seed", help="Seed for --limit and synthetic data.")]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", help="Samples per batch.")]
Workers = Annotated[Optional[int], typer.Option("--workers", help="Loader worker processes (default: 0 for "
                                                "in-memory data).", show_default=False)]
ClassMap = Annotated[Optional[str], typer.Option("--class-map", help="Folder name → class index: a text file "
                                                 "(one name a line) or JSON.", show_default=False)]


@dataclass
class ModelArgs:
    model: str
    checkpoint: str | None = None
    pretrained: bool = False
    num_classes: int | None = None
    model_kwargs: str | None = None
    ema: bool = False
    trust_checkpoint: bool = False
    blocks: str | None = None
    input_size: str | None = None
    mean: str | None = None
    std: str | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    device: str = "auto"
    precision: str = "fp32"

    def open(self):  # -> Probe
        from resprobe.probe import open_probe

        return open_probe(
            self.model, self.checkpoint, self.pretrained, self.num_classes, parse_json_option(self.model_kwargs),
            self.ema, self.trust_checkpoint, split_list(self.blocks), self.input_size, self.mean, self.std,
            self.crop_pct, self.interpolation, self.device, self.precision,
        )


def parse_json_option(text: str | None, option: str = "--model-kwargs") -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadValue(f"{option}: invalid JSON ({exc.msg} at position {exc.pos})") from None
    if not isinstance(value, dict):
        raise BadValue(f"{option}: expected a JSON object, e.g. '{{\"layers\": [2, 2, 2, 2]}}'")
    return value


def split_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    return items or None


def check_format(fmt: str) -> None:
    from resprobe.report import FORMATS

    if fmt not in FORMATS:
        raise BadValue(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")


def require(value: Any, option: str, what: str) -> Any:
    if value is None:
        raise BadValue(f"{option} is required: {what}")
    return value


# --------------------------------------------------------------------------------------------------
# Running a command: one-line errors, warnings on stderr, progress bars


def _one_line(message: str) -> str:
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if lines and lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]:
        # An error raised in a loader worker: its last line is "resprobe.errors.DataError: <message>".
        last = lines[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return " ".join(lines) if len(lines) <= 2 else lines[0]


def _show_warning(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    stderr.print(f"warning: {message}", markup=False)


@contextlib.contextmanager
def command_errors(debug: bool) -> Iterator[None]:
    """Turn every failure into one line on stderr with the right exit status."""
    saved = warnings.showwarning
    warnings.showwarning = _show_warning  # type: ignore[assignment]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
            yield
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        stderr.print("interrupted", markup=False)
        raise typer.Exit(130) from None
    except ResprobeError as exc:
        if debug:
            traceback.print_exc(file=sys.stderr)
        stderr.print(f"error: {_one_line(str(exc))}", markup=False)
        raise typer.Exit(1) from None
    except Exception as exc:  # noqa: BLE001 - never a traceback without --debug
        if debug:
            traceback.print_exc(file=sys.stderr)
        message = _one_line(str(exc)) or type(exc).__name__
        if message.startswith("Caught ") or isinstance(exc, RuntimeError) and "DataLoader worker" in str(exc):
            message = _one_line(str(exc))
        hint = "" if debug else " (run with --debug for the traceback)"
        stderr.print(f"error: {type(exc).__name__}: {message}{hint}", markup=False)
        raise typer.Exit(1) from None
    finally:
        warnings.showwarning = saved


def make_progress(quiet: bool) -> Progress:
    """Progress bars on stderr; none with --quiet or when stderr is not a terminal."""
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), console=stderr, disable=quiet or not stderr.is_terminal, transient=True,
    )


def note(quiet: bool, message: str) -> None:
    if not quiet:
        stderr.print(message, markup=False)


# --------------------------------------------------------------------------------------------------
# Commands


def _version(value: bool) -> None:
    if value:
        typer.echo(f"resprobe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """resprobe COMMAND MODEL [options]"""


@app.command("blocks")
def blocks_command(
    model: Model,
    checkpoint: Checkpoint = None, pretrained: Pretrained = False, num_classes: NumClasses = None,
    model_kwargs: ModelKwargs = None, ema: Ema = False, trust_checkpoint: Trust = False, blocks: BlocksGlob = None,
    input_size: InputSize = None,
    fmt: Format = "table", quiet: Quiet = False, debug: Debug = False,
) -> None:
    """List the residual blocks of MODEL in execution order, with stage, kind and shapes."""
    from resprobe.blocks import count_params
    from resprobe.report import blocks_table, emit

    with command_errors(debug):
        check_format(fmt)
        probe = ModelArgs(model, checkpoint, pretrained, num_classes, model_kwargs, ema, trust_checkpoint, blocks,
                          input_size, device="cpu").open()
        payload = {"model": str(probe.loaded.spec), "params": count_params(probe.model),
                   "input_size": list(probe.preprocessing.input_size),
                   "blocks": [b.to_dict() for b in probe.anatomy.blocks]}
        emit(payload, fmt, blocks_table, lambda p: p["blocks"])


@app.command("eval")
def eval_command(
    model: Model,
    data: Data = None, limit: Limit = None, seed: Seed = 0, batch_size: BatchSize = 64, workers: Workers = None,
    class_map: ClassMap = None,
    checkpoint: Checkpoint = None, pretrained: Pretrained = False, num_classes: NumClasses = None,
    model_kwargs: ModelKwargs = None, ema: Ema = False, trust_checkpoint: Trust = False, blocks: BlocksGlob = None,
    input_size: InputSize = None, mean: Mean = None, std: Std = None, crop_pct: CropPct = None,
    interpolation: Interpolation = None, device: Device = "auto", precision: Precision = "fp32",
    fmt: Format = "table", quiet: Quiet = False, debug: Debug = False,
) -> None:
    """Loss, top-1 and top-5 accuracy of MODEL on --data."""
    from resprobe.evaluate import evaluate
    from resprobe.report import emit, eval_table

    with command_errors(debug):
        check_format(fmt)
        require(data, "--data", "the images to evaluate on")
        probe = ModelArgs(model, checkpoint, pretrained, num_classes, model_kwargs, ema, trust_checkpoint, blocks,
                          input_size, mean, std, crop_pct, interpolation, device, precision).open()
        source = probe.data(data, limit, seed, class_map)
        loader = probe.loader(source, batch_size, workers)
        with make_progress(quiet) as progress:
            task = progress.add_task("eval", total=len(source))
            result = evaluate(probe.model, loader, probe.runtime, lambda n: progress.advance(task, n))
        payload = {"model": str(probe.loaded.spec), "data": data, **result.to_dict()}
        emit(payload, fmt, eval_table)


def main() -> None:
    app()
