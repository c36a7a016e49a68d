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


Out = Annotated[Optional[str], typer.Option("--out", "-o", help="The recording to write (HDF5).", show_default=False)]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out once the new run is complete.")]
Resume = Annotated[bool, typer.Option("--resume", help="Finish an interrupted run with its stored options.")]
SaveTensors = Annotated[Optional[int], typer.Option("--save-tensors", help="Also keep input/branch/update/grad "
                                                    "tensors of the first K samples.", show_default=False)]
TensorDtype = Annotated[Optional[str], typer.Option("--tensor-dtype", help="float32 (default) or float16 for "
                                                    "--save-tensors.", show_default=False)]
Target = Annotated[Optional[str], typer.Option("--target", help="Loss against the label (default) or the model's "
                                               "own prediction (pred).", show_default=False)]
Readout = Annotated[bool, typer.Option("--readout", help="Also apply the model's head after each last-stage block "
                                       "(paper §4.3).")]


def _record_options(model, data, limit, seed, batch_size, class_map, checkpoint, pretrained, num_classes, model_kwargs,
                    ema, blocks, input_size, mean, std, crop_pct, interpolation, precision, target, save_tensors,
                    tensor_dtype, readout):  # -> RecordOptions
    from resprobe.store import RecordOptions

    return RecordOptions(
        model=model, checkpoint=checkpoint, pretrained=pretrained or None, num_classes=num_classes,
        model_kwargs=parse_json_option(model_kwargs) if model_kwargs else None, ema=ema or None,
        blocks=split_list(blocks), input_size=input_size, mean=mean, std=std, crop_pct=crop_pct,
        interpolation=interpolation, data=data, class_map=class_map, limit=limit, seed=seed, batch_size=batch_size,
        target=target, save_tensors=save_tensors, tensor_dtype=tensor_dtype, precision=precision,
        readout=readout or None,
    )


def _run_record(options, out: str | None, overwrite: bool, resume: bool, device: str, workers, trust: bool,
                quiet: bool):
    """Record to ``out`` (durable) or, without ``out``, in memory; with a progress bar."""
    from resprobe.store import record, record_in_memory

    with make_progress(quiet) as progress:
        task = progress.add_task("record", total=None)

        def advance(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        if out is None:
            return record_in_memory(options, device, workers, trust, advance)
        return record(options, out, overwrite, resume, device, workers, trust, advance,
                      lambda message: warnings.warn(message, stacklevel=1))


@app.command("record")
def record_command(
    model: Annotated[Optional[str], typer.Argument(help="MODEL as for every command (may be left out with --resume).",
                                                   show_default=False)] = None,
    data: Data = None, out: Out = None, overwrite: Overwrite = False, resume: Resume = False,
    save_tensors: SaveTensors = None, tensor_dtype: TensorDtype = None, target: Target = None, readout: Readout = False,
    limit: Limit = None, seed: Annotated[Optional[int], typer.Option("--seed", help="Seed for --limit (default 0).",
                                                                     show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Samples per batch (default 64).",
                                                      show_default=False)] = None,
    workers: Workers = None, class_map: ClassMap = None,
    checkpoint: Checkpoint = None, pretrained: Pretrained = False, num_classes: NumClasses = None,
    model_kwargs: ModelKwargs = None, ema: Ema = False, trust_checkpoint: Trust = False, blocks: BlocksGlob = None,
    input_size: InputSize = None, mean: Mean = None, std: Std = None, crop_pct: CropPct = None,
    interpolation: Interpolation = None, device: Device = "auto",
    precision: Annotated[Optional[str], typer.Option("--precision", help="fp32 (default; TF32 off), tf32, bf16, fp16.",
                                                     show_default=False)] = None,
    fmt: Format = "table", quiet: Quiet = False, debug: Debug = False,
) -> None:
    """Record every block's per-sample statistics (delta, gradient, norms, cosines) into an HDF5 file.

    Durable: a run killed at any moment loses at most the batch in flight; finish it with --resume.
    """
    from resprobe.report import emit, record_table

    with command_errors(debug):
        check_format(fmt)
        require(out, "--out", "the HDF5 file to write, e.g. --out run.h5")
        if not resume:
            require(model, "MODEL", "which model to record")
            require(data, "--data", "the images to record on")
        options = _record_options(model, data, limit, seed, batch_size, class_map, checkpoint, pretrained, num_classes,
                                  model_kwargs, ema, blocks, input_size, mean, std, crop_pct, interpolation, precision,
                                  target, save_tensors, tensor_dtype, readout)
        result = _run_record(options, out, overwrite, resume, device, workers, trust_checkpoint, quiet)
        emit(result.to_dict(), fmt, record_table)


def _is_recording_path(text: str) -> bool:
    from pathlib import Path

    path = Path(text)
    if text.lower().endswith((".h5", ".hdf5")):
        return True
    if path.is_dir() and (path / "meta.json").exists():
        return True
    if path.is_file():
        with open(path, "rb") as fh:
            return fh.read(8) == b"\x89HDF\r\n\x1a\n"
    return False


@app.command("align")
def align_command(
    model: Annotated[str, typer.Argument(help="MODEL (records first) or RUN.h5 (a recording: nothing is recomputed).",
                                         show_default=False)],
    data: Data = None, out: Out = None, overwrite: Overwrite = False, readout: Readout = False,
    target: Target = None, limit: Limit = None, seed: Seed = 0, batch_size: BatchSize = 64, workers: Workers = None,
    class_map: ClassMap = None,
    checkpoint: Checkpoint = None, pretrained: Pretrained = False, num_classes: NumClasses = None,
    model_kwargs: ModelKwargs = None, ema: Ema = False, trust_checkpoint: Trust = False, blocks: BlocksGlob = None,
    input_size: InputSize = None, mean: Mean = None, std: Std = None, crop_pct: CropPct = None,
    interpolation: Interpolation = None, device: Device = "auto", precision: Precision = "fp32",
    fmt: Format = "table", quiet: Quiet = False, debug: Debug = False,
) -> None:
    """How well each block's residual F follows the negative loss gradient (cosine < 0 = refining), and how
    large it is (ℓ2 ratio), per block and per stage (paper §4.1)."""
    from resprobe.align import align_report
    from resprobe.report import align_table, emit
    from resprobe.store import open_recording

    with command_errors(debug):
        check_format(fmt)
        if _is_recording_path(model) and data is None:
            recorded = open_recording(model)
            if readout and not recorded.readout:
                raise BadValue(f"{model} holds no readout: record it with `resprobe record ... --readout`")
        else:
            require(data, "--data", "the images to align on (or give a recording RUN.h5 as the argument)")
            options = _record_options(model, data, limit, seed, batch_size, class_map, checkpoint, pretrained,
                                      num_classes, model_kwargs, ema, blocks, input_size, mean, std, crop_pct,
                                      interpolation, precision, target, None, None, readout)
            result = _run_record(options, out, overwrite, False, device, workers, trust_checkpoint, quiet)
            recorded = open_recording(result.out) if out else result
        payload = align_report(recorded)
        if not readout:
            payload.pop("readout", None)
        emit(payload, fmt, align_table, lambda p: p["blocks"])


def main() -> None:
    app()
