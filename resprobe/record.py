"""The record command: one hooked pass over the data written durably batch by batch, resumable."""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from resprobe import __version__
from resprobe.errors import BadValue, RecordingError, ResprobeError
from resprobe.errors import Interrupted as _Interrupted
from resprobe.recording.reader import open_recording, partial_dir
from resprobe.recording.recorder import Recorded
from resprobe.recording.writer import RunWriter, check_can_create

# Ctrl-C during a recording: the batch in flight was finished and made durable (exit status 130).
Interrupted = _Interrupted


@contextlib.contextmanager
def sigint_after_batch() -> Iterator[Callable[[], bool]]:
    """The first Ctrl-C asks the run to stop after the current batch; a second one stops at once."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested.is_set
        return

    def handler(signum: int, frame: Any) -> None:
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield requested.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass
class RecordResult:
    out: str
    n_samples: int
    complete: bool
    seconds: float
    warnings: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)  # model, checkpoint, preprocessing of the run

    def to_dict(self) -> dict[str, Any]:
        return {"out": self.out, "n_samples": self.n_samples, "complete": self.complete,
                "seconds": round(self.seconds, 3), **self.provenance}


def _provenance(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """What a record report says about the model it recorded (as every report that loads a model)."""
    return {key: attrs.get(key) for key in ("model", "checkpoint", "checkpoint_sha256", "weights_sha256",
                                            "preprocessing")}


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def run_recording(
    writer: RunWriter,
    recorder: Any,
    loader: Any,
    numbers: list[int],
    progress: Callable[[int], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> RecordResult:
    """Record the batches ``loader`` yields, which are the run's batches ``numbers`` (those not yet
    durable in ``writer``: all of them, the gaps a resume fills, or this process's share under
    torchrun); finish the file when all are done. Under torchrun every rank makes its batches
    durable and rank 0 merges the run once all have.

    Ctrl-C finishes the batch in flight, makes it durable and raises :class:`Interrupted` (the
    command line exits 130); the merge into ``RUN.h5`` at the end is not interrupted either.
    """
    from resprobe import distributed
    from resprobe.recording.recorder import NonfiniteTally

    start = time.perf_counter()
    names = [b["name"] for b in writer.meta["blocks"]]
    identity = [b.get("kind") == "identity" for b in writer.meta["blocks"]]
    tally = NonfiniteTally(names, identity)
    bad_batches: list[tuple[int, NonfiniteTally]] = []  # (batch number, its tally) where NaN or inf appeared
    batch_size = int(writer.meta.get("options", {}).get("batch_size") or 0)
    planned = iter(numbers)
    several = distributed.is_distributed()

    def interrupted() -> Interrupted:
        writer.flush()
        n_done = writer.durable_samples() if several else writer.n_done
        result = RecordResult(str(writer.path), n_done, False, time.perf_counter() - start,
                              provenance=_provenance(writer.meta.get("attrs", {})))
        return Interrupted(f"interrupted: {n_done} of {writer.meta['n_planned']} samples are recorded in "
                           f"{writer.dir}; finish with `resprobe record --out {writer.path} --resume`", result)

    pending: Any = None  # the batch launched last, not yet written
    launched_numbers: list[int] = []  # batch numbers of the launched, unwritten batches

    def launch(images: Any, labels: Any, indices: Any) -> Any:
        number = next(planned)
        recorder.samples_seen = number * batch_size  # --save-tensors keeps the run's first K samples
        launched_numbers.append(number)
        return recorder.launch_batch(images, labels, indices)

    def write_pending() -> None:
        nonlocal pending
        launched, pending = pending, None
        batch = launched.result()
        number = launched_numbers.pop(0)
        batch_tally = NonfiniteTally(names, identity)
        batch_tally.add(batch)
        if batch_tally.samples:
            bad_batches.append((number, batch_tally))
        tally.merge(batch_tally)
        writer.write_batch(batch, number)
        if progress:
            progress(len(batch))

    try:
        with sigint_after_batch() as stop_requested:
            try:
                for images, labels, indices in loader:
                    # On a GPU the next batch is launched before the previous one is awaited and
                    # written: the device computes one while the host waits for and writes the other.
                    launched = launch(images, labels, indices)
                    if pending is not None:
                        write_pending()
                    pending = launched
                    if not recorder.launches_ahead:
                        write_pending()
                    if stop_requested():
                        if pending is not None:
                            write_pending()
                        raise interrupted()
                if pending is not None:
                    write_pending()
            except Exception as exc:
                if pending is not None:  # what was computed is kept, if it can be
                    with contextlib.suppress(Exception):
                        write_pending()
                # Ctrl-C from a terminal also reaches the loader's worker processes, which then die:
                # that is the interruption, not an error of its own.
                if stop_requested() and not isinstance(exc, ResprobeError):
                    raise interrupted() from exc
                raise
            if several:  # every rank's batches, merged in batch order: the warning one process gives
                tally = NonfiniteTally(names, identity)
                gathered = [b for part in distributed.all_gather(bad_batches) for b in part]
                for _, batch_tally in sorted(gathered, key=lambda b: b[0]):
                    tally.merge(batch_tally)
            messages = tally.messages()
            if warn:
                for message in messages:
                    warn(message)
            if several:
                return _finish_sharded(writer, start, messages)
            out = writer.finish()
    except BaseException:
        with contextlib.suppress(Exception):
            writer.flush()
        writer.close()
        raise
    return RecordResult(str(out), writer.n_done, True, time.perf_counter() - start, messages,
                        _provenance(writer.meta.get("attrs", {})))


def _finish_sharded(writer: RunWriter, start: float, messages: list[str]) -> RecordResult:
    """torchrun: every rank's batches durable, then rank 0 merges ``RUN.h5`` and every rank reports it."""
    from resprobe import distributed

    writer.flush()
    distributed.barrier()  # every batch file is in place

    def merge() -> tuple[str, int]:
        writer.n_done = writer.durable_samples()
        return str(writer.finish()), writer.n_done

    out, n_done = distributed.on_main(merge)
    writer.close()
    return RecordResult(str(out), n_done, True, time.perf_counter() - start, messages,
                        _provenance(writer.meta.get("attrs", {})))


@dataclass
class RecordOptions:
    """Everything that decides a recording's numbers; stored in the run and reused by ``--resume``.

    ``None`` means "not given": the default, or on resume the stored value.
    """

    model: str | None = None
    checkpoint: str | None = None
    pretrained: bool | None = None
    num_classes: int | None = None
    model_kwargs: dict[str, Any] | None = None
    ema: bool | None = None
    blocks: list[str] | None = None
    input_size: str | None = None
    mean: str | None = None
    std: str | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    data: str | None = None
    class_map: str | None = None
    limit: int | None = None
    seed: int | None = None
    batch_size: int | None = None
    target: str | None = None
    save_tensors: int | None = None
    tensor_dtype: str | None = None
    precision: str | None = None
    readout: bool | None = None
    labels: str | None = None  # --labels FILE for a flat folder of images
    decode: str | None = None  # where image files are decoded: auto (on CUDA: the device), cpu, device
    # Language models (DESIGN §8); None for vision runs
    seq_len: int | None = None
    stride: int | None = None
    text_column: str | None = None
    tokenizer: str | None = None
    skip_tokens: int | None = None
    granularity: str | None = None
    trust_remote_code: bool | None = None

    DEFAULTS = {"pretrained": False, "ema": False, "seed": 0, "batch_size": 64, "target": "label", "save_tensors": 0,
                "tensor_dtype": "float32", "precision": "fp32", "readout": False, "model_kwargs": {},
                "decode": "auto"}

    def given(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def with_defaults(self) -> RecordOptions:
        values = dict(self.__dict__)
        for key, default in self.DEFAULTS.items():
            if values.get(key) is None:
                values[key] = default
        return RecordOptions(**values)


def resolve_stored_paths(stored: Mapping[str, Any], cwd: str | None) -> dict[str, Any]:
    """The stored options with relative file paths (MODEL, --data, --checkpoint, --class-map) made
    absolute against ``cwd``, the working directory of the run that stored them, so that ``--resume``
    works from any directory. Values that are not files there (``timm:resnet18``, ``synthetic:64``) stay."""
    resolved = dict(stored)
    if not cwd:
        return resolved  # a run from before the working directory was stored
    for key in _PATH_OPTIONS:
        value = resolved.get(key)
        if isinstance(value, str) and value and not os.path.isabs(os.path.expanduser(value)):
            candidate = os.path.join(cwd, value)
            if os.path.exists(candidate):
                resolved[key] = os.path.normpath(candidate)
    return resolved


def merge_resume_options(stored: Mapping[str, Any], given: RecordOptions, path: Path,
                         cwd: str | None = None) -> RecordOptions:
    """``--resume`` reuses the stored options (relative paths resolved against the run's ``cwd``); an
    explicitly given option that differs is refused."""
    stored = resolve_stored_paths(stored, cwd)
    for key, value in given.given().items():
        if key in stored and stored[key] != value and not (key in _PATH_OPTIONS and _same_model(stored[key], value)):
            flag = "MODEL" if key == "model" else "--" + key.replace("_", "-")
            raise RecordingError(f"--resume: {path} was recorded with {flag} {stored[key]!r}, not {value!r}; drop "
                                 f"{flag} or start anew with --overwrite")
    known = {k: stored.get(k) for k in RecordOptions.__dataclass_fields__}
    return RecordOptions(**known).with_defaults()


_PATH_OPTIONS = ("model", "data", "checkpoint", "class_map", "labels")


def _same_model(a: Any, b: Any) -> bool:
    return str(a) == str(b) or (os.path.exists(str(a)) and os.path.exists(str(b))
                                and os.path.samefile(str(a), str(b)))


def record(
    options: RecordOptions,
    out: str | Path,
    overwrite: bool = False,
    resume: bool = False,
    device: str = "auto",
    workers: int | None = None,
    trust_checkpoint: bool = False,
    progress: Callable[[int, int], None] | None = None,
    warn: Callable[[str], None] | None = None,
    offline: bool = False,
) -> RecordResult:
    """``resprobe record``: one hooked pass over the data into ``out`` (durable, resumable).

    ``progress(done, total)`` is called as samples complete.

    ``resume``: continue the interrupted run at ``out`` with its stored options (given ones must
    match); when nothing was recorded yet (the run was killed before its first batch) and MODEL and
    ``--data`` are given, a new run starts; a complete ``out`` is reported as it is.

    Under torchrun (:mod:`resprobe.distributed`) rank 0 decides, creates or resumes the run and holds
    its lock; every rank records its share of the missing batches into the same partial folder; rank
    0 merges them. A resume may use another number of processes: batch files are numbered by their
    place in the one-process order.
    """
    import torch
    from torch.utils.data import Subset

    from resprobe import distributed

    out = Path(out)
    if resume and overwrite:
        raise RecordingError("give either --resume or --overwrite, not both")
    _check_option_values(options)
    if workers is not None and workers < 0:
        raise BadValue(f"--workers must be 0 or more, got {workers}")
    writer: RunWriter | None = None

    def decide() -> tuple[str, RecordOptions, RecordResult | None]:
        """``new``, ``resume`` or ``complete`` (with its result), and the options to record with."""
        nonlocal writer
        mode = "resume" if resume else "new"
        if resume:
            state = _resume_state(out)
            if state == "complete":
                return "complete", options, _already_complete(out, options, warn)
            if state == "nothing":
                if options.model is None or options.data is None:
                    raise RecordingError(f"nothing to resume: neither {out} nor {partial_dir(out)} exists; start "
                                         "the recording without --resume")
                if warn:
                    warn(f"nothing of {out} was recorded yet: starting a new recording")
                mode = "new"
        if mode == "resume":
            writer = RunWriter.resume(out)
            try:
                merged = merge_resume_options(writer.meta.get("options", {}), options, out, writer.meta.get("cwd"))
            except BaseException:
                writer.close()
                raise
        else:
            merged = options.with_defaults()
            if merged.model is None or merged.data is None:
                raise RecordingError("record needs MODEL and --data")
            check_can_create(out, overwrite)  # before the model loads: a refusal costs nothing
        if merged.tensor_dtype not in ("float32", "float16"):
            raise RecordingError(f"--tensor-dtype {merged.tensor_dtype!r}: choose float32 or float16")
        return mode, merged, None

    # Rank 0 decides (it alone touches the run's folder until it holds the lock); the others follow.
    mode, options, finished = distributed.on_main(decide)
    if finished is not None:
        return finished
    created_here = False
    try:
        probe, source, readout = open_for_recording(options, device, trust_checkpoint, offline)
        blocks = [b.to_dict() for b in probe.anatomy.blocks]

        def open_writer() -> list[int]:
            nonlocal writer, created_here
            if writer is None:
                meta = {
                    "blocks": blocks,
                    "n_planned": len(source),
                    "options": options.__dict__,
                    "cwd": os.getcwd(),  # what relative paths in the options are relative to (for --resume)
                    "attrs": {
                        "resprobe_version": __version__, "created": now_iso(), **probe.describe(),
                        "data": options.data, "options": options.__dict__, "target": options.target,
                        "device": str(probe.runtime.device), "precision": options.precision,
                        "torch_version": torch.__version__, "n_planned": len(source),
                    },
                }
                writer = RunWriter.create(out, meta, overwrite=overwrite)
                created_here = True
            elif writer.meta["blocks"] != blocks or int(writer.meta["n_planned"]) != len(source):
                raise RecordingError(f"--resume: the model or data no longer match what {out} was recording "
                                     f"({len(source)} samples now, {writer.meta['n_planned']} planned)")
            else:
                check_same_weights(writer.meta.get("attrs", {}).get("weights_sha256"), probe.loaded.weights_sha256,
                                   f"--resume: {out} was recorded")
            return sorted(writer.done)

        done = set(distributed.on_main(open_writer))
        if writer is None:  # torchrun, rank > 0: rank 0 created or resumed the run
            writer = RunWriter.attach(out)
        batch_size = int(options.batch_size)
        ranges = distributed.batch_ranges(len(source), batch_size)
        writer.done = done
        numbers = distributed.my_batches(writer.missing_batches(len(ranges)))
        # The loader yields exactly this process's missing batches: nothing is loaded twice.
        positions = [p for k in numbers for p in ranges[k]]
        remaining = source
        if len(positions) != len(source):
            remaining = replace(source, dataset=Subset(source.dataset, positions))
        loader = probe.loader(remaining, batch_size, workers)
        total = len(source)
        done_count = [sum(len(ranges[k]) for k in done)]
        size = distributed.world().size

        def advance(n: int) -> None:  # torchrun: this rank's share counted for every rank (same pace)
            done_count[0] = min(total, done_count[0] + n * size)
            if progress:
                progress(done_count[0], total)

        if progress and done_count[0]:
            progress(done_count[0], total)
        dtype = torch.float16 if options.tensor_dtype == "float16" else torch.float32
        with _recorder_for(probe)(probe.anatomy, probe.runtime, target=str(options.target),
                                  save_tensors=int(options.save_tensors), tensor_dtype=dtype,
                                  readout=readout) as recorder:
            return run_recording(writer, recorder, loader, numbers, advance, warn)
    except BaseException:
        if writer is not None and created_here and not distributed.is_distributed():
            writer.discard_if_empty()
        raise
    finally:
        if writer is not None:
            writer.close()


def check_same_weights(recorded: str | None, here: str | None, what: str) -> None:
    """Refuse figures of other weights (``weights_sha256`` differs), whatever the weights' origin: a
    checkpoint changed in place, another random initialization. Recordings made before the
    fingerprint existed carry none and are not checked here."""
    if recorded and here and recorded != here:
        raise RecordingError(f"{what} with other weights (weights_sha256 {recorded[:12]}…, these are {here[:12]}…): "
                             "the checkpoint changed, or a model without weights was initialized otherwise; "
                             "record it again with these weights")


def _check_option_values(options: RecordOptions) -> None:
    """Values that are wrong whatever the model: refused before anything loads."""
    for name in ("batch_size", "limit"):
        value = getattr(options, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise BadValue(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if options.save_tensors is not None and options.save_tensors < 0:
        raise BadValue(f"--save-tensors must be 0 or more, got {options.save_tensors}")
    if options.target is not None and options.target not in ("label", "pred"):
        raise BadValue(f"--target {options.target!r}: choose label or pred")


def _resume_state(out: Path) -> str:
    """``partial`` (a run to continue, or one in progress), ``complete`` or ``nothing``."""
    directory = partial_dir(out)
    if directory.is_dir() and ((directory / "meta.json").exists() or RunWriter.is_locked(directory)):
        return "partial"
    return "complete" if out.exists() else "nothing"


def _already_complete(out: Path, options: RecordOptions, warn: Callable[[str], None] | None) -> RecordResult:
    recording = open_recording(out)
    if not recording.complete:
        raise RecordingError(f"{out} is incomplete and no batches are left to resume from; start anew with "
                             "--overwrite")
    stored = recording.attrs.get("options")
    merge_resume_options(stored if isinstance(stored, dict) else {}, options, out)
    if warn:
        warn(f"{out} is already complete: nothing to resume")
    return RecordResult(str(out), recording.n_samples, True, 0.0, provenance=_provenance(recording.attrs))


def open_for_recording(options: RecordOptions, device: str = "auto", trust_checkpoint: bool = False,
                       offline: bool = False) -> tuple[Any, Any, list[str]]:
    """The probe, the (limited) data source and the readout blocks that ``options`` describe."""
    from resprobe.models.causal_lm import is_lm_model

    if is_lm_model(options.model):
        return _open_lm_for_recording(options, device, offline)
    from resprobe.probe import open_probe

    probe = open_probe(str(options.model), options.checkpoint, bool(options.pretrained), options.num_classes,
                       options.model_kwargs, bool(options.ema), trust_checkpoint, options.blocks, options.input_size,
                       options.mean, options.std, options.crop_pct, options.interpolation, device,
                       str(options.precision), offline=offline, seed=int(options.seed or 0))
    probe.decode = str(options.decode or "auto")
    source = probe.data(str(options.data), options.limit, int(options.seed or 0), options.class_map,
                        labels=options.labels)
    last_stage = probe.anatomy.blocks[-1].stage
    readout = [b.name for b in probe.anatomy.blocks if b.stage == last_stage] if options.readout else []
    return probe, source, readout


def _open_lm_for_recording(options: RecordOptions, device: str, offline: bool) -> tuple[Any, Any, list[str]]:
    """:func:`open_for_recording` for a language model (DESIGN §8)."""
    from resprobe.lm_probe import open_lm_probe

    probe = open_lm_probe(str(options.model), options.tokenizer, device, str(options.precision), offline,
                          bool(options.trust_remote_code), options.granularity or "layer", options.seq_len,
                          options.stride, options.text_column, options.skip_tokens)
    source = probe.data(str(options.data), options.limit, int(options.seed or 0))
    return probe, source, []


def _recorder_for(probe: Any) -> Any:
    """The probe's own recorder (language models), or the vision :class:`Recorder`."""
    from resprobe.recording.recorder import Recorder

    return getattr(probe, "make_recorder", Recorder)


def record_in_memory(
    options: RecordOptions,
    device: str = "auto",
    workers: int | None = None,
    trust_checkpoint: bool = False,
    progress: Callable[[int, int], None] | None = None,
    offline: bool = False,
) -> Recorded:
    """The same pass as :func:`record`, kept in memory (``align MODEL`` without ``--out``)."""
    from resprobe.distributed import shard_source, world
    from resprobe.recording.recorder import NonfiniteTally, concat_batches, gather_batches, iterate

    _check_option_values(options)
    options = options.with_defaults()
    probe, source, readout = open_for_recording(options, device, trust_checkpoint, offline)
    # torchrun: each rank records its batches, gathered back in one-process order below
    loader = probe.loader(shard_source(source, int(options.batch_size)), int(options.batch_size), workers)
    done = [0]
    size = world().size

    def advance(n: int) -> None:  # torchrun: this rank's share counted for every rank (same pace)
        done[0] = min(len(source), done[0] + n * size)
        if progress:
            progress(done[0], len(source))

    with _recorder_for(probe)(probe.anatomy, probe.runtime, str(options.target), readout=readout) as recorder:
        batches = gather_batches(list(iterate(recorder, loader, advance)))
    blocks = [b.to_dict() for b in probe.anatomy.blocks]
    tally = NonfiniteTally([b["name"] for b in blocks], [b["kind"] == "identity" for b in blocks])
    for batch in batches:
        tally.add(batch)
    for message in tally.messages():
        warnings.warn(message, stacklevel=2)
    recorded = concat_batches(batches, blocks)
    recorded.attrs = {**probe.describe(), "data": options.data}
    recorded.n_planned = len(source)
    return recorded
