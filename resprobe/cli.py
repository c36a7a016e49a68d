"""The ``resprobe`` command line: parse options, call the library, render. Nothing else.

Reports go to stdout; progress, warnings and errors to stderr. Exit codes: 0 success, 1 an error
resprobe detected (one line on stderr; ``--debug`` for the traceback), 2 a usage error raised by
the argument parser, 130 interrupted (also while the libraries import), 141 stdout closed by its
reader (``| head``), quietly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, NoReturn, Optional

EXIT_INTERRUPTED = 130
EXIT_STDOUT_CLOSED = 141  # 128 + SIGPIPE: what a shell reports for a Unix tool whose reader went away


def _exit_interrupted() -> NoReturn:
    sys.stderr.write("interrupted\n")
    sys.stderr.flush()
    raise SystemExit(EXIT_INTERRUPTED)


try:  # Ctrl-C while the libraries load (the first seconds) is one line too, not an import traceback
    import typer
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    from rich.text import Text

    from resprobe import __version__
    from resprobe.errors import BadValue, Interrupted, ResprobeError
except KeyboardInterrupt:
    _exit_interrupted()

app = typer.Typer(
    name="resprobe",
    help="Probe trained residual networks: does each block refine along the negative loss gradient "
    "(align), which blocks can go (ablate), can a stage become one shared iterated block (share)?",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# Notes and errors quote paths, specs and class names: shown as typed (no markup, no emoji codes).
stderr = Console(stderr=True, highlight=False, soft_wrap=True, markup=False, emoji=False)

# --------------------------------------------------------------------------------------------------
# Options shared by the commands (Annotated aliases keep each signature readable)

Model = Annotated[str, typer.Argument(help="torchvision:NAME[:WEIGHTS] | timm:NAME | NAME | hf-hub:ORG/NAME | "
                                      "checkpoint PATH | package.module:callable | "
                                      "transformers:NAME_OR_DIR[@REV] (a causal LM)", show_default=False)]
Format = Annotated[str, typer.Option("--format", "-f", help="Report format: table, json or csv.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or notes on stderr.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")]
Checkpoint = Annotated[Optional[str], typer.Option("--checkpoint", help="Weights file: state dict, .safetensors, "
                                                   "timm/torchvision training checkpoint.", show_default=False)]
Pretrained = Annotated[bool, typer.Option("--pretrained", help="timm/torchvision pretrained weights, as they load "
                                          "them (downloaded into their caches when not there).")]
Offline = Annotated[bool, typer.Option("--offline", help="Never use the network: pretrained weights and hfds: "
                                       "datasets from the local caches only (as HF_HUB_OFFLINE=1).")]
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
Data = Annotated[Optional[str], typer.Option("--data", help="Image folder | images.tar | hfds:NAME[:split] | "
                                             "cifar10:DIR[:train|test] | cifar100:DIR[:split] | arrays .npz/.h5 | "
                                             "synthetic[:N].",
                                             show_default=False)]
Limit = Annotated[Optional[int], typer.Option("--limit", help="Use N samples, chosen reproducibly by --seed.",
                                              show_default=False)]
Seed = Annotated[int, typer.Option("--seed", help="Seed for --limit, synthetic data and the initialization of a "
                                   "model without weights.")]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", help="Samples per batch.")]
Workers = Annotated[Optional[int], typer.Option("--workers", help="Loader worker processes (default: 0 for "
                                                "in-memory data).", show_default=False)]
Labels = Annotated[Optional[str], typer.Option("--labels", help="Labels of a flat image folder: the devkit's "
                                               "ILSVRC2012_validation_ground_truth.txt (meta.mat beside it) or a CSV "
                                               "of file,class (e.g. LOC_val_solution.csv).", show_default=False)]
Decode = Annotated[str, typer.Option("--decode", help="Where image files are decoded and resized: auto (the GPU on "
                                     "CUDA), cpu (worker processes, PIL) or device.")]
RecordDecode = Annotated[Optional[str], typer.Option("--decode", help="auto (the GPU on CUDA; default), cpu or "
                                                   "device: where image files are decoded.", show_default=False)]
ClassMap = Annotated[Optional[str], typer.Option("--class-map", help="Folder name → class index: a text file "
                                                 "(one name a line) or JSON.", show_default=False)]

# Language models (DESIGN §8): options that only `transformers:` models read
SeqLen = Annotated[Optional[int], typer.Option("--seq-len", help="Language models: tokens per window (default: "
                                               "min(1024, the model's maximum positions)).", show_default=False)]
Stride = Annotated[Optional[int], typer.Option("--stride", help="Language models: window start every S tokens "
                                               "(default: --seq-len); overlaps score only new tokens.",
                                               show_default=False)]
TextColumnOpt = Annotated[Optional[str], typer.Option("--text-column", help="Language models: the text column of "
                                                   ".jsonl/.parquet/hfds: data (default text).", show_default=False)]
TokenizerOpt = Annotated[Optional[str], typer.Option("--tokenizer", help="Language models: another tokenizer "
                                                     "(hub id or folder) than the model's.", show_default=False)]
SkipTokens = Annotated[Optional[int], typer.Option("--skip-tokens", help="Language models: leave the first K "
                                                   "positions of each window out of the statistics (not the loss).",
                                                   show_default=False)]
Granularity = Annotated[Optional[str], typer.Option("--granularity", help="Language models: layer (default) or "
                                                    "sublayer (NAME:attn and NAME:mlp).", show_default=False)]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="Language models: run the model's own "
                                               "code from its repository (only for code you trust).")]


@dataclass
class LMArgs:
    """The language-model options of one command (ignored by vision models)."""

    seq_len: int | None = None
    stride: int | None = None
    text_column: str | None = None
    tokenizer: str | None = None
    skip_tokens: int | None = None
    granularity: str | None = None
    trust_remote_code: bool = False

    def open(self, model: str, device: str, precision: str, offline: bool):  # -> LMProbe
        from resprobe.lm_probe import open_lm_probe

        return open_lm_probe(model, self.tokenizer, device, precision, offline, self.trust_remote_code,
                             self.granularity or "layer", self.seq_len, self.stride, self.text_column,
                             self.skip_tokens)


def is_lm(model: str | None) -> bool:
    from resprobe.models.causal_lm import is_lm_model

    return is_lm_model(model)


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
    offline: bool = False
    decode: str = "auto"

    def open(self, for_training: bool = False, seed: int = 0):  # -> Probe
        from resprobe.probe import open_probe

        probe = open_probe(
            self.model, self.checkpoint, self.pretrained, self.num_classes, parse_json_option(self.model_kwargs),
            self.ema, self.trust_checkpoint, split_list(self.blocks), self.input_size, self.mean, self.std,
            self.crop_pct, self.interpolation, self.device, self.precision, offline=self.offline,
            for_training=for_training, seed=seed,
        )
        probe.decode = self.decode
        return probe


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
    from resprobe.render.report import FORMATS

    if fmt not in FORMATS:
        raise BadValue(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")


def provenance(probe: Any) -> dict[str, Any]:
    """``checkpoint`` and ``preprocessing`` (as used) for every report that loads a model (as rp.ablate's)."""
    from resprobe.api import report_provenance

    return report_provenance(probe)


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


class _HeldNotes(logging.Handler):
    """resprobe's notes (``logging`` INFO of the ``resprobe`` logger, e.g. the preprocessing used),
    held with the warnings."""

    def __init__(self, pending: list[str]):
        super().__init__(logging.INFO)
        self.pending = pending

    def emit(self, record: logging.LogRecord) -> None:
        self.pending.append(record.getMessage())


@contextlib.contextmanager
def command_errors(debug: bool, quiet: bool = False, scale_out: bool = False) -> Iterator[None]:
    """Turn every failure into one line on stderr with the right exit status.

    Warnings and notes are held until the command's outcome is known: shown when it succeeds or is
    interrupted, dropped when it fails (an error is exactly one line; ``--debug`` shows them too).
    ``--quiet`` drops the notes (not the warnings).

    Under torchrun (:mod:`resprobe.distributed`): a ``scale_out`` command runs on every rank in the
    process group, and only rank 0 writes the report, progress and warnings; when the command
    succeeds, rank 0 shows every rank's distinct warnings (a warning about a sample on another rank
    is not lost). Any other command runs on rank 0 alone (the other ranks end at once, exit 0).
    """
    from resprobe import distributed

    launched = distributed.launched()
    if launched.distributed and not scale_out and not launched.main:
        raise typer.Exit(0)
    several = launched.distributed and scale_out
    with contextlib.ExitStack() as stack:
        if launched.distributed and not scale_out:  # rank 0 alone, also when a script's process group is up
            stack.enter_context(distributed.alone())
        if several and not launched.main:  # one report: rank 0's
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
        distributed.reset_error_channel()
        # Registered before the error handling, so it runs after it: the store client of the error
        # channel is released while the process runs normally, not torn down at interpreter exit
        # (a torchrun child then sometimes aborted: "terminate called without an active exception").
        stack.callback(distributed.reset_error_channel)
        pending = stack.enter_context(_errors_once(debug, launched, quiet))
        if several:  # entered inside the error handling: a group that cannot form is one line too
            stack.enter_context(distributed.process_group())
            stack.enter_context(distributed.error_channel())  # an error every rank hits: one line
            stack.enter_context(_warnings_to_rank_0(pending))
            stack.enter_context(distributed.lockstep())
        yield


@contextlib.contextmanager
def _warnings_to_rank_0(pending: list[str]) -> Iterator[None]:
    """torchrun: after a command that succeeded on every rank, the other ranks' held warnings and notes
    join rank 0's (in rank order; :func:`_errors_once` shows each distinct line once). Only on success:
    after an error or Ctrl-C some rank may never get here, and a failure shows one line anyway."""
    from resprobe import distributed

    yield
    gathered = distributed.all_gather(list(pending))
    if distributed.is_main():
        pending[:] = [line for lines in gathered for line in lines]


@contextlib.contextmanager
def _errors_once(debug: bool, launched: Any, quiet: bool = False) -> Iterator[list[str]]:
    """:func:`command_errors`' work: one line per failure, and in a run of several processes one line
    per run (a rank other than 0 prints its error only when rank 0 does not print the same line:
    :func:`resprobe.distributed.should_speak`; torchrun ends the others as soon as one process exits
    with an error). Yields the list of held warnings and notes."""
    from resprobe.distributed import PEER_GRACE_SECONDS, PeerFailed, should_speak

    saved = warnings.showwarning
    pending: list[str] = []
    logger = logging.getLogger("resprobe")
    notes = _HeldNotes(pending)
    saved_level = logger.level
    if not quiet:
        logger.addHandler(notes)
        logger.setLevel(logging.INFO)

    several = launched.distributed

    def say(text: str) -> None:
        if several and not should_speak(text, launched.main):  # rank 0 printed the same line
            return
        stderr.print(text, markup=False)

    def hold_warning(message: Any, category: type, filename: str, lineno: int, file: Any = None,
                     line: Any = None) -> None:
        pending.append(f"warning: {message}")

    def show_pending() -> None:
        if several and not launched.main:  # rank 0 shows them (gathered there after a success)
            pending.clear()
        for text in dict.fromkeys(pending):
            stderr.print(text, markup=False)
        pending.clear()

    warnings.showwarning = hold_warning  # type: ignore[assignment]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
            yield pending
        show_pending()
    except typer.Exit:
        show_pending()
        raise
    except KeyboardInterrupt:
        show_pending()
        _announce_interrupt("interrupted", launched.main)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Interrupted as exc:  # Ctrl-C honoured after making the work durable
        show_pending()
        _announce_interrupt(_one_line(str(exc)) or "interrupted", launched.main)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except BrokenPipeError as exc:
        if not stdout_closed():
            raise_one_line(debug, exc, say)
        quiet_after_closed_stdout()
    except PeerFailed as exc:  # another rank failed and said why; torchrun ends this one
        if debug:
            traceback.print_exc(file=sys.stderr)
        time.sleep(PEER_GRACE_SECONDS)
        if launched.main:
            stderr.print(f"error: {_one_line(str(exc))}", markup=False)
        raise typer.Exit(1) from None
    except ResprobeError as exc:
        if debug:
            show_pending()
            traceback.print_exc(file=sys.stderr)
        say(f"error: {_one_line(str(exc))}")
        raise typer.Exit(1) from None
    except Exception as exc:  # noqa: BLE001 - never a traceback without --debug
        if debug:
            show_pending()
        raise_one_line(debug, exc, say)
    finally:
        warnings.showwarning = saved
        logger.removeHandler(notes)
        logger.setLevel(saved_level)


def raise_one_line(debug: bool, exc: BaseException, say: Callable[[str], None]) -> NoReturn:
    """An unexpected error: one line through ``say`` (the traceback too with ``--debug``), exit status 1."""
    if debug:
        traceback.print_exc(file=sys.stderr)
    message = _one_line(str(exc)) or type(exc).__name__
    hint = "" if debug else " (run with --debug for the traceback)"
    say(f"error: {type(exc).__name__}: {message}{hint}")
    raise typer.Exit(1) from None


class _Announced:
    """Whether "interrupted" (or the run's own interruption line) is already on stderr."""

    interrupt = False


def _announce_interrupt(text: str, speak: bool = True) -> None:
    """Say ``text`` (only rank 0 speaks under torchrun) and mark the interruption as announced, so that
    :func:`main` adds no second line on any rank."""
    if speak:
        stderr.print(text, markup=False)
    _Announced.interrupt = True


def stdout_closed() -> bool:
    """Whether stdout is a pipe (or socket) whose reader has gone away (``resprobe ... | head -1``).

    A BrokenPipeError from anything else (a loader worker's pipe) is a real error. poll() reports a
    write end whose reader closed as POLLERR; where poll is missing, a closed stdout is assumed."""
    if not hasattr(select, "poll"):
        return True
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no file descriptor (a notebook, CliRunner)
        return False


def quiet_after_closed_stdout() -> NoReturn:
    """Stop without a word, as Unix tools do when their reader stops reading (``| head``).

    stdout is pointed at /dev/null first so that flushing it at exit cannot raise again (Python's
    documented recipe for SIGPIPE); the status is 141, what a shell shows for a tool ended by SIGPIPE."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    raise typer.Exit(EXIT_STDOUT_CLOSED)


class RateColumn(ProgressColumn):
    """Items per second over rich's recent window: images, unless the task names another ``unit``."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "img")
        return Text(f"{task.speed:,.1f} {unit}/s" if task.speed else "")


def make_progress(quiet: bool) -> Progress:
    """Progress bars on stderr (images/s and an ETA); none with --quiet or when stderr is not a terminal."""
    return Progress(
        TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), RateColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), console=stderr, disable=quiet or not stderr.is_terminal or not _main_rank(),
        transient=True,
    )


def run_advance(progress: Progress, task: Any, total: int) -> Callable[[int], None]:
    """The callback that moves ``task``, a bar over the whole run's ``total`` samples. Under torchrun
    this (rank 0's) callback counts only its own share: the bar shows that times the processes, at
    most ``total`` (the ranks hold equal shares, but for the last batch, and go at the same pace)."""
    from resprobe.distributed import world

    size, done = world().size, [0]

    def advance(n: int) -> None:
        done[0] += n
        progress.update(task, completed=min(total, done[0] * size))

    return advance


def _main_rank() -> bool:
    """Only rank 0 of a torchrun run shows progress and notes (true outside torchrun)."""
    from resprobe.distributed import launched

    return launched().main


def _same_command_with(command: str, flag: str, drop: str) -> str:
    """This ``command`` line with ``flag`` added and ``drop`` left out, to paste (under torchrun as
    launched); in words when resprobe was called otherwise (a script, a test)."""
    import shlex

    from resprobe.distributed import launched

    args = sys.argv[1:]
    if not args or args[0] != command:
        return f"the same command and {flag}"
    here = launched()
    prefix = f"torchrun --nproc-per-node {here.size} -m resprobe" if here.distributed else "resprobe"
    return " ".join([prefix, shlex.join([a for a in args if a != drop] + [flag])])


def note(quiet: bool, message: str) -> None:
    if not quiet and _main_rank():
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
    offline: Offline = False,
    seq_len: SeqLen = None, granularity: Granularity = None, trust_remote_code: TrustRemoteCode = False,
    tokenizer: TokenizerOpt = None,
    fmt: Format = "table", quiet: Quiet = False, debug: Debug = False,
) -> None:
    """List the residual blocks of MODEL in execution order, with stage, kind and shapes."""
    from resprobe.models.blocks import count_params
    from resprobe.render.report import blocks_table, emit

    with command_errors(debug, quiet):
        check_format(fmt)
        if is_lm(model):
            from resprobe.evaluate_lm import blocks_payload

            lm = LMArgs(seq_len, None, None, tokenizer, None, granularity, trust_remote_code)
            payload = blocks_payload(lm.open(model, "cpu", "fp32", offline))
            emit(payload, fmt, blocks_table, lambda p: p["blocks"])
            return
        probe = ModelArgs(model, checkpoint, pretrained, num_classes, model_kwargs, ema, trust_checkpoint, blocks,
                          input_size, device="cpu", offline=offline).open()
        payload = {"model": str(probe.loaded.spec), **provenance(probe), "params": count_params(probe.model),
                   "input_size": list(probe.preprocessing.input_size),
                   "blocks": [b.to_dict() for b in probe.anatomy.blocks]}
        from resprobe.share import SHARED_ATTR, shared_weights_summary

        if SHARED_ATTR in probe.model._modules:  # a shared model: shared blocks once, blocks their own
            payload["shared"] = shared_weights_summary(probe.anatomy)
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
    offline: Offline = False, labels: Labels = None, decode: Decode = "auto",
    seq_len: SeqLen = None, stride: Stride = None, text_column: TextColumnOpt = None, tokenizer: TokenizerOpt = None,
    trust_remote_code: TrustRemoteCode = False,
    fmt: Format = "table", quiet: Quiet = False, debug: Debug = False,
) -> None:
    """Loss, top-1 and top-5 accuracy of MODEL on --data (language models: loss per token, perplexity)."""
    from resprobe.evaluate import evaluate
    from resprobe.render.report import emit, eval_table

    with command_errors(debug, quiet, scale_out=True):
        check_format(fmt)
        if is_lm(model):
            from resprobe.evaluate_lm import eval_payload
            from resprobe.render.report import lm_eval_table

            require(data, "--data", "the text to evaluate on (text:PATH or hfds:NAME)")
            probe = LMArgs(seq_len, stride, text_column, tokenizer, None, None, trust_remote_code).open(
                model, device, precision, offline)
            with make_progress(quiet) as progress:
                task = progress.add_task("eval", total=None)
                payload = eval_payload(probe, data, limit, seed, batch_size, lambda n: progress.advance(task, n))
            emit(payload, fmt, lm_eval_table, lambda p: [{k: v for k, v in p.items() if k != "protocol"}])
            return
        require(data, "--data", "the images to evaluate on")
        probe = ModelArgs(model, checkpoint, pretrained, num_classes, model_kwargs, ema, trust_checkpoint, blocks,
                          input_size, mean, std, crop_pct, interpolation, device, precision, offline,
                          decode).open(seed=seed)
        from resprobe.distributed import shard_source

        whole = probe.data(data, limit, seed, class_map, labels=labels)
        loader = probe.loader(shard_source(whole, batch_size), batch_size, workers)  # torchrun: this rank's batches
        with make_progress(quiet) as progress:
            task = progress.add_task("eval", total=len(whole))
            result = evaluate(probe.model, loader, probe.runtime, run_advance(progress, task, len(whole)))
        payload = {"model": str(probe.loaded.spec), **provenance(probe), "data": data, **result.to_dict()}
        emit(payload, fmt, eval_table, lambda p: [{k: v for k, v in p.items() if k != "preprocessing"}])


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
                    tensor_dtype, readout, labels=None, decode=None, lm=None):  # -> RecordOptions
    from resprobe.record import RecordOptions

    lm = lm or LMArgs()

    return RecordOptions(
        model=model, checkpoint=checkpoint, pretrained=pretrained or None, num_classes=num_classes,
        model_kwargs=parse_json_option(model_kwargs) if model_kwargs else None, ema=ema or None,
        blocks=split_list(blocks), input_size=input_size, mean=mean, std=std, crop_pct=crop_pct,
        interpolation=interpolation, data=data, class_map=class_map, limit=limit, seed=seed, batch_size=batch_size,
        target=target, save_tensors=save_tensors, tensor_dtype=tensor_dtype, precision=precision,
        readout=readout or None, labels=labels, decode=decode,
        seq_len=lm.seq_len, stride=lm.stride, text_column=lm.text_column, tokenizer=lm.tokenizer,
        skip_tokens=lm.skip_tokens, granularity=lm.granularity, trust_remote_code=lm.trust_remote_code or None,
    )


def _run_record(options, out: str | None, overwrite: bool, resume: bool, device: str, workers, trust: bool,
                quiet: bool, offline: bool = False):
    """Record to ``out`` (durable) or, without ``out``, in memory; with a progress bar."""
    from resprobe.record import record, record_in_memory

    with make_progress(quiet) as progress:
        task = progress.add_task("record", total=None)

        def advance(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        if out is None:
            return record_in_memory(options, device, workers, trust, advance, offline=offline)
        return record(options, out, overwrite, resume, device, workers, trust, advance,
                      lambda message: warnings.warn(message, stacklevel=1), offline=offline)


@app.command("record")
def record_command(
    model: Annotated[Optional[str], typer.Argument(help="MODEL as for every command (may be left out with --resume).",
                                                   show_default=False)] = None,
    data: Data = None, out: Out = None, overwrite: Overwrite = False, resume: Resume = False,
    save_tensors: SaveTensors = None, tensor_dtype: TensorDtype = None, target: Target = None, readout: Readout = False,
    limit: Limit = None, seed: Annotated[Optional[int], typer.Option("--seed", help="Seed for --limit and the "
                                                                     "initialization of a model without weights "
                                                                     "(default 0).",
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
    offline: Offline = False, labels: Labels = None, decode: RecordDecode = None,
    seq_len: SeqLen = None, stride: Stride = None, text_column: TextColumnOpt = None, tokenizer: TokenizerOpt = None,
    skip_tokens: SkipTokens = None, granularity: Granularity = None, trust_remote_code: TrustRemoteCode = False,
    fmt: Format = "table", quiet: Quiet = False, debug: Debug = False,
) -> None:
    """Record every block's per-sample statistics (delta, gradient, norms, cosines) into an HDF5 file.

    Durable: a run killed at any moment loses at most the batch in flight; finish it with --resume.
    On CUDA a fused Triton kernel computes the statistics (RESPROBE_FUSED_STATS=0 turns it off).
    """
    from resprobe.render.report import emit, record_table

    with command_errors(debug, quiet, scale_out=True):
        check_format(fmt)
        require(out, "--out", "the HDF5 file to write, e.g. --out run.h5")
        if not resume:
            require(model, "MODEL", "which model to record")
            require(data, "--data", "the images to record on")
        options = _record_options(model, data, limit, seed, batch_size, class_map, checkpoint, pretrained, num_classes,
                                  model_kwargs, ema, blocks, input_size, mean, std, crop_pct, interpolation, precision,
                                  target, save_tensors, tensor_dtype, readout, labels, decode,
                                  LMArgs(seq_len, stride, text_column, tokenizer, skip_tokens, granularity,
                                         trust_remote_code))
        try:
            result = _run_record(options, out, overwrite, resume, device, workers, trust_checkpoint, quiet, offline)
        except Interrupted as exc:
            if exc.result is not None:  # the report says what is durable: complete false
                emit(exc.result.to_dict(), fmt, record_table)
            raise
        emit(result.to_dict(), fmt, record_table)


def _is_recording_path(text: str) -> bool:
    from pathlib import Path

    path = Path(text)
    if text.lower().endswith((".h5", ".hdf5")):
        return True
    if path.is_dir() and (path / "meta.json").exists():
        return True
    if path.is_file():
        try:
            with open(path, "rb") as fh:
                return fh.read(8) == b"\x89HDF\r\n\x1a\n"
        except OSError:
            return False
    return False


def _is_not_a_model_file(text: str) -> bool:
    """An existing path that cannot be a MODEL checkpoint (``align FILE`` without --data: a recording)."""
    from pathlib import Path

    from resprobe.models.checkpoints import looks_like_checkpoint

    path = Path(text)
    return path.exists() and not (path.is_file() and looks_like_checkpoint(path))


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
    offline: Offline = False, labels: Labels = None, decode: Decode = "auto",
    seq_len: SeqLen = None, stride: Stride = None, text_column: TextColumnOpt = None, tokenizer: TokenizerOpt = None,
    skip_tokens: SkipTokens = None, granularity: Granularity = None, trust_remote_code: TrustRemoteCode = False,
    fmt: Format = "table", quiet: Quiet = False, debug: Debug = False,
) -> None:
    """How well each block's residual F follows the negative loss gradient (cosine < 0 = refining), and how
    large it is (ℓ2 ratio), per block and per stage (paper §4.1)."""
    from resprobe.align import align_report
    from resprobe.render.report import align_table, emit
    from resprobe.recording.reader import open_recording

    with command_errors(debug, quiet, scale_out=True):
        check_format(fmt)
        if data is None and (_is_recording_path(model) or _is_not_a_model_file(model)):
            recorded = open_recording(model)
            if readout and not recorded.readout:
                raise BadValue(f"{model} holds no readout: record it with `resprobe record ... --readout`")
        else:
            require(data, "--data", "the images to align on (or give a recording RUN.h5 as the argument)")
            options = _record_options(model, data, limit, seed, batch_size, class_map, checkpoint, pretrained,
                                      num_classes, model_kwargs, ema, blocks, input_size, mean, std, crop_pct,
                                      interpolation, precision, target, None, None, readout, labels,
                                      None if decode == "auto" else decode,
                                      LMArgs(seq_len, stride, text_column, tokenizer, skip_tokens, granularity,
                                             trust_remote_code))
            result = _run_record(options, out, overwrite, False, device, workers, trust_checkpoint, quiet, offline)
            recorded = open_recording(result.out) if out else result
        payload = align_report(recorded)  # with the readout whenever the recording holds one
        emit(payload, fmt, align_table, lambda p: p["blocks"])


By = Annotated[str, typer.Option("--by", help="Rank removals by loss or acc (rank 1 = most harmful).")]
IncludeTransitions = Annotated[bool, typer.Option("--include-transitions", help="Also remove transition blocks "
                                                  "(residual branch removed, shortcut kept).")]
Cumulative = Annotated[Optional[int], typer.Option("--cumulative", help="Greedy curve: remove the least harmful "
                                                   "block, re-rank the rest, repeat K times.", show_default=False)]
OneShot = Annotated[Optional[int], typer.Option("--one-shot", help="Curve from one ranking: remove its K least "
                                                "harmful blocks one after another (ShortGPT).", show_default=False)]
Proxies = Annotated[bool, typer.Option("--proxies", help="Cheap per-block predictors of removal cost (block "
                                       "influence, angular distance, ℓ2 ratio, alignment cosine, first-order "
                                       "estimate) and their rank correlation with the exact cost.")]
Recording = Annotated[Optional[str], typer.Option("--recording", help="Take cos, ℓ2 ratio and the first-order "
                                                  "estimate from RUN.h5 instead of recording (implies --proxies).",
                                                  show_default=False)]
Unroll = Annotated[Optional[str], typer.Option("--unroll", help="BLOCK:K[:S] — apply an identity block K more "
                                               "times, damped by S (default 1) (paper §4.4).", show_default=False)]
SavePruned = Annotated[Optional[str], typer.Option("--save-pruned", help="Write the model without the blocks "
                                                   "of --remove / --remove-blocks as a resprobe checkpoint.",
                                                   show_default=False)]
ReplacePruned = Annotated[bool, typer.Option("--overwrite", help="Replace an existing --save-pruned file.")]
Remove = Annotated[Optional[int], typer.Option("--remove", help="For --save-pruned: the first N blocks of the "
                                               "greedy order (--cumulative), else of the one-shot order.",
                                               show_default=False)]
RemoveBlocks = Annotated[Optional[str], typer.Option("--remove-blocks", help="For --save-pruned: these blocks "
                                                     "(comma-separated names).", show_default=False)]


Spans = Annotated[Optional[int], typer.Option("--spans", help="Language models: also remove every contiguous run "
                                             "of 1..N layers (Gromov et al.).", show_default=False)]


def _ablate_lm(model, data, by, include_transitions, cumulative, one_shot, proxies, recording, unroll, save_pruned,
               overwrite, remove, remove_blocks, limit, seed, batch_size, device, precision, offline, spans,
               lm: LMArgs, fmt, quiet) -> None:
    """``ablate`` of a transformers causal LM (resprobe.ablate_lm)."""
    from resprobe.ablate_lm import LMAblateOptions, run_lm_ablation
    from resprobe.distributed import shard_source
    from resprobe.render.report import ablate_rows, emit, lm_ablate_table

    require(data, "--data", "the text to evaluate removals on (text:PATH or hfds:NAME)")
    for given, option in ((by != "loss", f"--by {by}"), (include_transitions, "--include-transitions"),
                          (recording is not None, "--recording"), (unroll is not None, "--unroll")):
        if given:
            raise BadValue(f"{option} is not supported for language models")
    if remove_blocks is not None and not split_list(remove_blocks):
        raise BadValue("--remove-blocks: give layer names, e.g. --remove-blocks model.layers.3,model.layers.4")
    options = LMAblateOptions(cumulative, one_shot, spans, proxies, remove, split_list(remove_blocks), save_pruned,
                              overwrite)
    options.check()  # before the model loads: a typo costs nothing
    probe = lm.open(model, device, precision, offline)
    source = probe.data(data, limit, seed)
    loader = probe.loader(shard_source(source, batch_size), batch_size)  # torchrun: this rank's windows
    with make_progress(quiet) as progress:
        report = run_lm_ablation(probe, loader, options, _progress_factory(progress, len(source)), len(source))
    payload = {"model": probe.loaded.spec, "checkpoint": None, "data": data, **report,
               "precision": probe.loaded.precision, "protocol": probe.protocol}
    emit(payload, fmt, lm_ablate_table, ablate_rows)


def _progress_factory(progress: Progress, samples: int) -> Callable[[str, int], Callable[[int], None]]:
    """One progress bar per pass over the data: the run's ``samples`` (under torchrun the library
    counts one rank's shard)."""

    def start(description: str, total: int) -> Callable[[int], None]:
        task = progress.add_task(description, total=samples)
        return run_advance(progress, task, samples)

    return start


@app.command("ablate")
def ablate_command(
    model: Model,
    data: Data = None, by: By = "loss", include_transitions: IncludeTransitions = False,
    cumulative: Cumulative = None, one_shot: OneShot = None, proxies: Proxies = False, recording: Recording = None,
    unroll: Unroll = None, save_pruned: SavePruned = None, overwrite: ReplacePruned = False, remove: Remove = None,
    remove_blocks: RemoveBlocks = None, limit: Limit = None, seed: Seed = 0, batch_size: BatchSize = 64, workers: Workers = None,
    class_map: ClassMap = None,
    checkpoint: Checkpoint = None, pretrained: Pretrained = False, num_classes: NumClasses = None,
    model_kwargs: ModelKwargs = None, ema: Ema = False, trust_checkpoint: Trust = False, blocks: BlocksGlob = None,
    input_size: InputSize = None, mean: Mean = None, std: Std = None, crop_pct: CropPct = None,
    interpolation: Interpolation = None, device: Device = "auto", precision: Precision = "fp32",
    offline: Offline = False, labels: Labels = None, decode: Decode = "auto",
    spans: Spans = None,
    seq_len: SeqLen = None, stride: Stride = None, text_column: TextColumnOpt = None, tokenizer: TokenizerOpt = None,
    skip_tokens: SkipTokens = None, granularity: Granularity = None, trust_remote_code: TrustRemoteCode = False,
    fmt: Format = "table", quiet: Quiet = False, debug: Debug = False,
) -> None:
    """Which blocks can go: loss and accuracy with each block removed (exact), greedy or one-shot removal
    curves, cheap proxies, unrolling, pruned checkpoints (paper §4.2, §4.4). Language models: loss per
    token and perplexity, spans of layers, and pruned transformers folders (docs/llm.md)."""
    from resprobe.ablate import AblateOptions, parse_unroll, run_ablation
    from resprobe.render.report import ablate_rows, ablate_table, emit

    with command_errors(debug, quiet, scale_out=True):
        check_format(fmt)
        if is_lm(model):
            _ablate_lm(model, data, by, include_transitions, cumulative, one_shot, proxies, recording, unroll,
                       save_pruned, overwrite, remove, remove_blocks, limit, seed, batch_size, device, precision,
                       offline, spans, LMArgs(seq_len, stride, text_column, tokenizer, skip_tokens, granularity,
                                              trust_remote_code), fmt, quiet)
            return
        if spans is not None:
            raise BadValue("--spans is for language models (transformers: MODEL)")
        require(data, "--data", "the images to evaluate removals on")
        options = AblateOptions(by=by, include_transitions=include_transitions, cumulative=cumulative,
                                one_shot=one_shot, proxies=proxies, recording=recording,
                                unroll=parse_unroll(unroll) if unroll is not None else None,
                                save_pruned=save_pruned, overwrite=overwrite, remove=remove,
                                remove_blocks=split_list(remove_blocks) if remove_blocks is not None else None,
                                data=data)
        if remove_blocks is not None and not options.remove_blocks:
            raise BadValue("--remove-blocks: give block names, e.g. --remove-blocks layer3.4,layer3.5")
        options.check()  # before the model loads: a typo costs nothing
        probe = ModelArgs(model, checkpoint, pretrained, num_classes, model_kwargs, ema, trust_checkpoint, blocks,
                          input_size, mean, std, crop_pct, interpolation, device, precision, offline,
                          decode).open(seed=seed)
        source = probe.data(data, limit, seed, class_map, labels=labels)
        from resprobe.distributed import shard_source

        loader = probe.loader(shard_source(source, batch_size), batch_size, workers)  # torchrun: this rank's batches
        with make_progress(quiet) as progress:
            report = run_ablation(probe, loader, options, _progress_factory(progress, len(source)))
        payload = {"model": str(probe.loaded.spec), **provenance(probe), "data": data, **report.to_dict()}
        emit(payload, fmt, ablate_table, ablate_rows)


# --------------------------------------------------------------------------------------------------
# share and finetune

ModelOut = Annotated[Optional[str], typer.Option("--out", "-o", help="The resprobe checkpoint to write (usable as "
                                                 "MODEL by every command).", show_default=False)]
ReplaceOut = Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out.")]
Stages = Annotated[Optional[str], typer.Option("--stages", help="Comma-separated stage indices (default: every stage "
                                               "with two or more identity blocks).", show_default=False)]
ShareInit = Annotated[str, typer.Option("--init", help="Shared weights from the average, first or last replaced "
                                        "block.")]
Iterations = Annotated[Optional[int], typer.Option("--iterations", help="Apply the shared block K times (default: "
                                                   "once per replaced block).", show_default=False)]
NormMode = Annotated[str, typer.Option("--norm", help="unshared (per-iteration norms) or shared (naive sharing).")]
GammaInit = Annotated[str, typer.Option("--gamma-init", help="copy (each iteration's norms from its replaced block) "
                                        "or 0.1 (the same with every norm weight γ = 0.1).")]
LoraRank = Annotated[Optional[int], typer.Option("--lora-rank", help="Per-iteration rank-R corrections of every "
                                                 "shared conv/linear weight.", show_default=False)]
TrainData = Annotated[Optional[str], typer.Option("--train-data", help="Training images for --recalibrate (never "
                                                  "the evaluation data).", show_default=False)]
Recalibrate = Annotated[Optional[int], typer.Option("--recalibrate", help="Re-estimate norm statistics on N "
                                                    "training images first.", show_default=False)]


def _evaluate_with_progress(probe, loader, n: int, progress: Progress, label: str) -> dict[str, Any]:
    from resprobe.evaluate import evaluate

    task = progress.add_task(label, total=n)
    result = evaluate(probe.model, loader, probe.runtime, lambda k: progress.advance(task, k))
    progress.remove_task(task)
    return result.to_dict()


Span = Annotated[Optional[str], typer.Option("--span", help="Language models: layers A..B−1 to share, as A:B.",
                                           show_default=False)]
Period = Annotated[int, typer.Option("--period", help="Language models: P shared layers looped (B−A)/P times.")]


def _refuse_vision_share_options(**given: Any) -> None:
    """Options of vision sharing that a language model's share does not read: refused, not ignored."""
    for name, value in given.items():
        if value is not None:
            flag = "--" + name.replace("_", "-")
            raise BadValue(f"{flag} is not used when sharing a language model (use --span A:B [--period P])")


def _share_lm(model: str, out: str | None, overwrite: bool, span: str | None, period: int, init: str, norm: str,
              lora_rank: int | None, data: str | None, limit: int | None, seed: int, batch_size: int, lm: LMArgs,
              device: str, precision: str, offline: bool, fmt: str, quiet: bool) -> None:
    """``share`` of a language model (DESIGN §8): the span shared, evaluated before and after on --data."""
    from resprobe.models.causal_lm import decoder_layers, save_lm_checkpoint
    from resprobe.render.report import emit, share_table
    from resprobe.share import check_out_path
    from resprobe.share_lm import SpanOptions, parse_span, share_span

    start, end = parse_span(span)
    options = SpanOptions(start, end, period, init, norm, lora_rank).validate()
    out_path = check_out_path(require(out, "--out", "the shared model to write, e.g. --out shared.pt"), overwrite)
    probe = lm.open(model, device, precision, offline)
    options.validate(len(decoder_layers(probe.model)[1]))  # the span in range before any evaluation
    loader = probe.loader(probe.data(data, limit, seed), batch_size) if data else None
    evals: dict[str, Any] = {"eval_original": None, "eval_shared": None}
    with make_progress(quiet) as progress:
        if loader is not None:
            evals["eval_original"] = _evaluate_lm_with_progress(probe, loader, progress, "eval original")
        result = share_span(probe.model, options)
        if loader is not None:
            evals["eval_shared"] = _evaluate_lm_with_progress(probe, loader, progress, "eval shared")
    payload = {"model": probe.loaded.spec, "checkpoint": None, "out": str(out_path), "data": data,
               "precision": probe.loaded.precision, "params_before": result.params_before,
               "params_after": result.params_after, "spans": [s.to_dict() for s in result.spans],
               "stages": [s.to_dict() for s in result.stages], **evals}
    save_lm_checkpoint(out_path, probe.loaded, probe.model, [*probe.loaded.recipes, result.recipe],
                       meta={"share": {k: v for k, v in payload.items() if k != "out"}}, replace=overwrite)
    emit(payload, fmt, share_table, lambda p: p["stages"])


def _evaluate_lm_with_progress(probe, loader, progress: Progress, label: str) -> dict[str, Any]:
    """``{n, loss, perplexity, n_tokens, protocol}`` of the probe's model on ``loader``."""
    from resprobe.evaluate_lm import evaluate_lm

    task = progress.add_task(label, total=None)
    result = evaluate_lm(probe.model, loader, probe.runtime.device, lambda k: progress.advance(task, k))
    progress.remove_task(task)
    return {"n": result["n_windows"], "loss": result["loss"], "perplexity": result["perplexity"],
            "n_tokens": result["n_tokens"], "protocol": probe.protocol}


@app.command("share")
def share_command(
    model: Model,
    out: ModelOut = None, overwrite: ReplaceOut = False, stages: Stages = None, init: ShareInit = "average",
    iterations: Iterations = None, norm: NormMode = "unshared", gamma_init: GammaInit = "copy",
    lora_rank: LoraRank = None,
    data: Data = None, train_data: TrainData = None, recalibrate: Recalibrate = None,
    recalibrate_scope: Annotated[str, typer.Option("--recalibrate-scope", help="shared (the shared stages' norms) "
                                                   "or all (every norm of the model).")] = "shared",
    limit: Limit = None, seed: Seed = 0, batch_size: BatchSize = 64, workers: Workers = None,
    class_map: ClassMap = None,
    checkpoint: Checkpoint = None, pretrained: Pretrained = False, num_classes: NumClasses = None,
    model_kwargs: ModelKwargs = None, ema: Ema = False, trust_checkpoint: Trust = False, blocks: BlocksGlob = None,
    input_size: InputSize = None, mean: Mean = None, std: Std = None, crop_pct: CropPct = None,
    interpolation: Interpolation = None, device: Device = "auto", precision: Precision = "fp32",
    offline: Offline = False,
    span: Span = None, period: Period = 1,
    seq_len: SeqLen = None, stride: Stride = None, text_column: TextColumnOpt = None, tokenizer: TokenizerOpt = None,
    trust_remote_code: TrustRemoteCode = False,
    fmt: Format = "table", quiet: Quiet = False, debug: Debug = False,
) -> None:
    """Turn the identity blocks of stages into one shared block applied in place, with per-iteration norms
    (paper §4.5), optionally relaxed by per-iteration low-rank corrections; write it as a checkpoint.
    Language models: --span A:B [--period P] loops P shared decoder layers over layers A..B−1."""
    from resprobe.data.loaders import limit_source
    from resprobe.models.checkpoints import save_resprobe_checkpoint
    from resprobe.render.report import emit, share_table
    from resprobe.share import (ShareOptions, check_out_path, check_rebuildable, check_recalibrate_scope, parse_stages,
                                share_stages)
    from resprobe.share import recalibrate as recalibrate_norms

    with command_errors(debug, quiet):
        check_format(fmt)
        if is_lm(model):
            _refuse_vision_share_options(stages=stages, iterations=iterations, recalibrate=recalibrate,
                                         train_data=train_data, checkpoint=checkpoint,
                                         gamma_init=None if gamma_init == "copy" else gamma_init)
            _share_lm(model, out, overwrite, span, period, init, norm, lora_rank, data, limit, seed, batch_size,
                      LMArgs(seq_len, stride, text_column, tokenizer, None, None, trust_remote_code), device,
                      precision, offline, fmt, quiet)
            return
        if span is not None or period != 1:
            raise BadValue("--span and --period share decoder layers of a language model (transformers:NAME); "
                           "for other models name stages with --stages")
        options = ShareOptions(parse_stages(stages), iterations, init, norm, gamma_init, lora_rank).validate()
        out_path = check_out_path(require(out, "--out", "the shared model to write, e.g. --out shared.pt"), overwrite)
        if recalibrate is not None and train_data is None:
            raise BadValue("--recalibrate needs --train-data: the training images to re-estimate norm statistics on")
        if train_data is not None and recalibrate is None:
            raise BadValue("--train-data is used only with --recalibrate N")
        if recalibrate is not None and recalibrate < 1:
            raise BadValue(f"--recalibrate must be at least 1, got {recalibrate}")
        check_recalibrate_scope(recalibrate_scope)
        probe = ModelArgs(model, checkpoint, pretrained, num_classes, model_kwargs, ema, trust_checkpoint, blocks,
                          input_size, mean, std, crop_pct, interpolation, device, precision,
                          offline).open(seed=seed)
        check_rebuildable(probe.loaded)
        eval_source = probe.data(data, limit, seed, class_map) if data else None
        train_source = probe.data(train_data, None, seed, class_map) if train_data else None
        eval_loader = probe.loader(eval_source, batch_size, workers) if eval_source else None
        evals: dict[str, Any] = {"eval_original": None, "eval_shared": None, "eval_shared_recalibrated": None}
        recalibrated = 0
        with make_progress(quiet) as progress:
            if eval_loader is not None:
                evals["eval_original"] = _evaluate_with_progress(probe, eval_loader, len(eval_source), progress,
                                                                 "eval original")
            result = share_stages(probe.model, probe.anatomy, options)
            if eval_loader is not None:
                evals["eval_shared"] = _evaluate_with_progress(probe, eval_loader, len(eval_source), progress,
                                                               "eval shared")
            if recalibrate is not None and train_source is not None:
                n = min(recalibrate, len(train_source))
                task = progress.add_task("recalibrate", total=n)
                calib = probe.loader(limit_source(train_source, n, seed), batch_size, workers)
                recalibrated = recalibrate_norms(probe.model, calib, probe.runtime, n, recalibrate_scope,
                                                 lambda k: progress.advance(task, k))
                progress.remove_task(task)
                if eval_loader is not None:
                    evals["eval_shared_recalibrated"] = _evaluate_with_progress(
                        probe, eval_loader, len(eval_source), progress, "eval recalibrated")
        payload = {"model": str(probe.loaded.spec), **provenance(probe), "out": str(out_path), "data": data,
                   "params_before": result.params_before, "params_after": result.params_after,
                   "stages": [s.to_dict() for s in result.stages], **evals,
                   "recalibrated": recalibrated if recalibrate is not None else None}
        save_resprobe_checkpoint(out_path, probe.loaded, probe.model, recipes=[*probe.loaded.recipes, result.recipe],
                                 preprocessing=probe.preprocessing_used.to_dict(),
                                 meta={"share": {k: v for k, v in payload.items() if k != "out"}},
                                 replace=overwrite)  # without --overwrite a file that appeared meanwhile stays
        emit(payload, fmt, share_table, lambda p: p["stages"])


@app.command("finetune")
def finetune_command(
    model: Model,
    data: Annotated[Optional[str], typer.Option("--data", help="Training images: folder | cifar10:DIR:train | arrays "
                                                ".npz/.h5 | synthetic[:N].", show_default=False)] = None,
    val_data: Annotated[Optional[str], typer.Option("--val-data", help="Validation images, evaluated after each "
                                                    "epoch; the best by loss goes to PATH.best.pt.",
                                                    show_default=False)] = None,
    out: ModelOut = None, overwrite: ReplaceOut = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in --out exactly where it "
                                         "stopped (same options).")] = False,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Passes over --data (default 1).",
                                                  show_default=False)] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Optimizer steps instead of --epochs.",
                                                     show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate (default 0.01 for SGD, 1e-3 for "
                                                "AdamW).", show_default=False)] = None,
    optimizer: Annotated[Optional[str], typer.Option("--optimizer", help="sgd (momentum 0.9, Nesterov; default for "
                                                     "vision models) or adamw (default for language models).",
                                                     show_default=False)] = None,
    momentum: Annotated[float, typer.Option("--momentum", help="SGD momentum.")] = 0.9,
    weight_decay: Annotated[Optional[float], typer.Option("--weight-decay", help="On weights of 2+ dimensions only "
                                                          "(default 5e-4 for SGD, 0.05 for AdamW).",
                                                          show_default=False)] = None,
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", help="Linear warmup steps before the cosine "
                                              "decay.")] = 0,
    augment: Annotated[Optional[str], typer.Option("--augment", help="none, light (flip + padded random crop; default "
                                                   "for vision models) or timm (timm's training transform); language "
                                                   "models: none.", show_default=False)] = None,
    recalibrate: Recalibrate = None,
    recalibrate_scope: Annotated[str, typer.Option("--recalibrate-scope", help="all (every norm of the model) or "
                                                   "shared (only the shared stages' norms).")] = "all",
    limit: Limit = None,
    val_limit: Annotated[Optional[int], typer.Option("--val-limit", help="Use N validation samples.",
                                                     show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for data order, augmentation, --limit and "
                                      "initialization.")] = 0,
    compile_model: Annotated[bool, typer.Option("--compile", help="torch.compile the training step (on an H200: "
                                                "1.23x faster bf16 steps after about 40 s of compiling; "
                                                "training goes on eagerly, with a warning, if compiling "
                                                "fails).")] = False,
    sync_bn: Annotated[bool, typer.Option("--sync-bn", help="Under torchrun: BatchNorm statistics over the global "
                                          "batch (SyncBatchNorm), so N processes × B equal one process × N·B.")] = False,
    accum_steps: Annotated[int, typer.Option("--accum-steps", help="Micro-batches of --batch-size per optimizer "
                                             "step (gradient accumulation).")] = 1,
    val_every: Annotated[Optional[int], typer.Option("--val-every", help="Also validate, add a history row and save "
                                                     "the resumable --out every N steps (not only after each "
                                                     "epoch).", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Samples per batch and process (under "
                                            "torchrun the global batch is processes × this × --accum-steps).")] = 64,
    workers: Workers = None, class_map: ClassMap = None,
    checkpoint: Checkpoint = None, pretrained: Pretrained = False, num_classes: NumClasses = None,
    model_kwargs: ModelKwargs = None, ema: Ema = False, trust_checkpoint: Trust = False, blocks: BlocksGlob = None,
    input_size: InputSize = None, mean: Mean = None, std: Std = None, crop_pct: CropPct = None,
    interpolation: Interpolation = None, device: Device = "auto", precision: Precision = "fp32",
    offline: Offline = False,
    seq_len: SeqLen = None, stride: Stride = None, text_column: TextColumnOpt = None, tokenizer: TokenizerOpt = None,
    trust_remote_code: TrustRemoteCode = False,
    fmt: Format = "table", quiet: Quiet = False, debug: Debug = False,
) -> None:
    """Fine-tune MODEL (original, pruned, shared or randomly initialized) on --data; --out holds the last state,
    PATH.best.pt the best by --val-data loss; --resume continues an interrupted run exactly. Language models:
    next-token loss on text windows, --out is a save_pretrained folder (DIR.best the best), and MODEL may be a
    config folder without weights (initialized from --seed)."""
    from resprobe.render.report import emit, finetune_table
    from resprobe.share import check_rebuildable
    from resprobe.train import FinetuneOptions, TrainingInterrupted, check_new_out, finetune

    with command_errors(debug, quiet, scale_out=True):
        check_format(fmt)
        lm = is_lm(model)
        require(data, "--data", "the training text (text:PATH or hfds:NAME)" if lm else "the training images")
        require(out, "--out", "the folder to write, e.g. --out finetuned" if lm else
                "the checkpoint to write, e.g. --out finetuned.pt")
        optimizer = optimizer or ("adamw" if lm else "sgd")
        augment = augment or ("none" if lm else "light")
        options = FinetuneOptions(out, epochs, max_steps, lr, optimizer, momentum, weight_decay, warmup_steps, augment,
                                  recalibrate, recalibrate_scope, batch_size, workers, seed, resume,
                                  overwrite, compile_model, sync_bn=sync_bn, accum_steps=accum_steps,
                                  val_every=val_every).validate()
        if lm:
            lm_args = LMArgs(seq_len, stride, text_column, tokenizer, None, None, trust_remote_code)
            _finetune_lm(model, lm_args, options, data, val_data, limit, val_limit, device, precision, offline,
                         fmt, quiet)
            return
        if not resume:
            check_new_out(out, overwrite)
        probe = ModelArgs(model, checkpoint, pretrained, num_classes, model_kwargs, ema, trust_checkpoint, blocks,
                          input_size, mean, std, crop_pct, interpolation, device, precision,
                          offline).open(for_training=True, seed=seed)  # from scratch: random weights are meant
        check_rebuildable(probe.loaded)
        from resprobe.probe import randomly_initialized

        if randomly_initialized(probe.loaded, pretrained) and not resume:  # a note, held as the others are
            logging.getLogger("resprobe").info(f"{model} is randomly initialized: finetune trains it from scratch")
        train_source = probe.data(data, limit, seed, class_map)
        val_source = probe.data(val_data, val_limit, seed, class_map) if val_data else None
        with make_progress(quiet) as progress:
            on_step, on_eval = _finetune_progress(progress, val_source, plain_log=False)
            calib_task = progress.add_task("recalibrate", total=recalibrate or 0, visible=False)
            try:
                result = finetune(probe, train_source, val_source, options, on_step=on_step, eval_progress=on_eval,
                                  recalibrate_progress=lambda n: progress.update(calib_task, advance=n, visible=True))
            except TrainingInterrupted as exc:  # the state is saved: say how to continue
                raise Interrupted(f"{exc}; continue with `{_same_command_with('finetune', '--resume', '--overwrite')}`") \
                    from None
        if not result.complete:
            note(quiet, f"stopped at step {result.steps}; continue with --resume")
        emit({**result.to_dict(), **provenance(probe)}, fmt, finetune_table, lambda p: p["history"])


def _finetune_progress(progress: Any, val_source: Any, plain_log: bool) -> tuple[Any, Any]:
    """``finetune``'s progress callbacks: ``on_step(state)`` moves the training bar (and with ``plain_log``
    writes a line every 10 steps), ``on_eval(n)`` the validation bar."""
    from resprobe import distributed

    train_task = progress.add_task("train", total=None, unit="step")
    val_task = progress.add_task("validate", total=len(val_source) if val_source else 0, visible=False)

    def on_step(state: Any) -> None:
        loss = "" if state.loss is None else f" loss {state.loss:.4f}"
        progress.update(train_task, total=state.total_steps, completed=state.step,
                        description=f"train epoch {state.epoch + 1}{loss}")
        if plain_log and (state.step % 10 == 0 or state.step == state.total_steps):
            print(f"{time.strftime('%H:%M:%S')} step {state.step}/{state.total_steps} epoch {state.epoch + 1}"
                  f"{loss} lr {state.lr:.3g}", file=sys.stderr, flush=True)

    val_size = distributed.world().size  # torchrun: on_eval counts one rank's share

    def on_eval(n: int) -> None:
        task = next(t for t in progress.tasks if t.id == val_task)
        if task.finished:
            progress.reset(val_task)
        progress.update(val_task, completed=min(task.total or 0, task.completed + n * val_size), visible=True)

    return on_step, on_eval


def _finetune_lm(model: str, lm: LMArgs, options: Any, data: str, val_data: str | None, limit: int | None,
                 val_limit: int | None, device: str, precision: str, offline: bool, fmt: str, quiet: bool) -> None:
    """``finetune`` for a language model (resprobe.train_lm): windows of --data, perplexity on --val-data."""
    from resprobe.lm_probe import open_lm_probe
    from resprobe.render.report import emit, finetune_table
    from resprobe.train import TrainingInterrupted
    from resprobe.train_lm import finetune_lm

    if not options.resume and not options.overwrite and os.path.exists(os.path.expanduser(options.out)):
        raise BadValue(f"--out {options.out} already exists; continue the interrupted run with --resume, or pass "
                       "--overwrite to replace it")  # before the text is tokenized; the rest is checked later
    probe = open_lm_probe(model, lm.tokenizer, device, precision, offline, lm.trust_remote_code, "layer", lm.seq_len,
                          lm.stride, lm.text_column, None, seed=options.seed)
    train_source = probe.data(data, limit, options.seed)
    val_source = probe.data(val_data, val_limit, options.seed) if val_data else None
    with make_progress(quiet) as progress:
        # No live bar when stderr is a file (nohup): a plain line every 10 steps instead.
        on_step, on_eval = _finetune_progress(progress, val_source, plain_log=not quiet and not sys.stderr.isatty())
        try:
            result = finetune_lm(probe, train_source, val_source, options, on_step=on_step, eval_progress=on_eval)
        except TrainingInterrupted as exc:  # the state is saved: say how to continue
            raise Interrupted(f"{exc}; continue with `{_same_command_with('finetune', '--resume', '--overwrite')}`") \
                from None
    if not result.complete:
        note(quiet, f"stopped at step {result.steps}; continue with --resume")
    payload = {**result.to_dict(), "model": probe.loaded.spec, "checkpoint": None, "data": data, "val_data": val_data,
               "protocol": train_source.protocol}
    emit(payload, fmt, finetune_table, lambda p: p["history"])


PlotKind = Annotated[str, typer.Option("--kind", help="auto (everything the input holds), align, readout or ablate.")]


@app.command("plot")
def plot_command(
    source: Annotated[str, typer.Argument(help="A recording RUN.h5 (or its RUN.h5.partial folder), or the JSON of "
                                          "`resprobe align -f json` or `resprobe ablate -f json` (- for stdin).",
                                          show_default=False)],
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="The figure to write: FILE.png or FILE.svg.",
                                               show_default=False)] = None,
    kind: PlotKind = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out.")] = False,
    fmt: Format = "table", quiet: Quiet = False, debug: Debug = False,
) -> None:
    """Draw a figure: per-block alignment and ℓ2 ratio (with the last-stage readout when recorded) from a
    recording or an align JSON, or per-block removal cost, removal curve and proxies from an ablate JSON."""
    from resprobe.render.plot import plot
    from resprobe.render.report import emit, plot_table

    with command_errors(debug, quiet):
        check_format(fmt)
        require(out, "--out", "the figure to write, e.g. --out align.png (or .svg)")
        result = plot(source, out, kind, overwrite)
        # CSV: one row, panels joined by ";" (the generic list rule would join them with "x", as for shapes)
        emit(result.to_dict(), fmt, plot_table, lambda p: [{**p, "panels": ";".join(p["panels"])}])

def main() -> None:
    """The ``resprobe`` command (also ``python -m resprobe``). Ctrl-C at any moment ends with exit
    status 130 and one line on stderr: typer turns an interrupt outside a command's error handling
    (e.g. while a command imports torch) into a silent exit 130, which gets its line here."""
    try:
        app()
    except KeyboardInterrupt:
        _exit_interrupted()
    except SystemExit as exc:
        if exc.code == EXIT_INTERRUPTED and not _Announced.interrupt:
            _exit_interrupted()
        raise
