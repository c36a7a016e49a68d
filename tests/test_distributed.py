"""torchrun: two gloo processes on the CPU give what one process gives (record, align, ablate, eval,
finetune), resume with another number of processes, one line and exit 1 when one rank fails.

The two-process runs are real ``torchrun`` launches (``python -m torch.distributed.run``), one
thread per process; several commands share a launch (tests/distributed_worker.py) because starting
processes that import torch is the main cost. The one-process references run in this process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DATA, HERE, MODEL, ROOT, invoke
from resprobe import distributed
from resprobe.record import RecordOptions, record
from resprobe.recording.reader import open_recording, partial_dir

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

LAUNCH_TIMEOUT = 300  # seconds; a hang fails the test instead of the suite


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    return env


def torchrun(*args: str, cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node N ARGS`` with this Python, each process one thread."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    # In a session of its own, so that a launch that hangs is ended with all its processes (killing
    # torchrun alone would leave its workers running).
    with subprocess.Popen(command, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=LAUNCH_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def run_jobs(jobs: list[tuple], tmp: Path, nproc: int = 2) -> dict[str, str]:
    """Several CLI commands in one two-process launch (``(name, args)`` or ``(name, args, settings)``,
    see tests/distributed_worker.py); each job's rank-0 stdout by name (asserting that every rank exited
    0 and that no other rank wrote to stdout), and the launch's stderr as ``"(stderr)"``."""
    spec = tmp / "jobs.json"
    spec.write_text(json.dumps({"dir": str(tmp), "jobs": [[n, [str(a) for a in args], *more]
                                                          for n, args, *more in jobs]}))
    done = torchrun(str(HERE / "distributed_worker.py"), str(spec), cwd=tmp, nproc=nproc)
    assert done.returncode == 0, done.stderr[-3000:]
    outputs = {"(stderr)": done.stderr}
    for name, *_ in jobs:
        for rank in range(nproc):
            code = (tmp / f"{name}.rank{rank}.code").read_text()
            assert code == "0", (name, rank, done.stderr[-3000:])
            if rank:
                assert (tmp / f"{name}.rank{rank}.out").read_text() == "", name
        outputs[name] = (tmp / f"{name}.rank0.out").read_text()
    return outputs


def one_json(text: str) -> dict:
    """stdout holds exactly one JSON document."""
    decoder = json.JSONDecoder()
    payload, end = decoder.raw_decode(text.strip())
    assert text.strip()[end:].strip() == "", "more than one report on stdout"
    return payload


def assert_close(a, b, tol: float, path: str = "") -> None:
    """Equal structures; numbers equal to ``tol`` relative (and absolute)."""
    if isinstance(a, dict):
        assert set(a) == set(b), (path, set(a) ^ set(b))
        for k in a:
            assert_close(a[k], b[k], tol, f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, tol, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, (int, float)):
        assert abs(a - b) <= tol * max(1.0, abs(a)), (path, a, b)
    else:
        assert a == b, (path, a, b)


COMMON = ["--limit", "120", "--seed", "3", "-b", "16", "--device", "cpu"]
ABLATE = ["ablate", MODEL, "--data", DATA, *COMMON, "--cumulative", "3", "--proxies", "--unroll", "layer4.1:1:0.5",
          "-f", "json"]
FINETUNE = ["finetune", MODEL, "--data", DATA, "--val-data", DATA, "--limit", "128", "--val-limit", "64",
            "--max-steps", "4", "--sync-bn", "--device", "cpu", "-f", "json", "--overwrite"]


def partial_run(tmp: Path, name: str, batches: int) -> Path:
    """A one-process recording interrupted after ``batches`` batches (the partial folder kept)."""
    out = tmp / name
    seen = []

    def stop_after(done: int, total: int) -> None:
        seen.append(done)
        if len(seen) > batches:
            raise KeyboardInterrupt

    options = RecordOptions(model=MODEL, data=DATA, limit=120, seed=3, batch_size=16)
    with pytest.raises(KeyboardInterrupt):
        record(options, out, device="cpu", progress=stop_after)
    assert partial_dir(out).is_dir() and not out.exists()
    return out


def test_two_processes_equal_one(tmp_path):
    """record, align MODEL, ablate (single removals, greedy order, proxies, unrolling, a pruned
    checkpoint), eval and finetune --sync-bn on two processes against one process; record resumed
    by two processes from one process's interrupted run (with a gap)."""
    resumed = partial_run(tmp_path, "resumed.h5", batches=3)
    (partial_dir(resumed) / "batch-000001.npz").unlink()  # a gap: batches 0 and 2 are kept
    jobs = [
        ("record", ["record", MODEL, "--data", DATA, *COMMON, "--out", tmp_path / "two.h5", "-f", "json"]),
        ("resume", ["record", "--out", resumed, "--resume", "--device", "cpu", "-f", "json"]),
        ("align", ["align", MODEL, "--data", DATA, *COMMON, "-f", "json"]),
        ("ablate", [*ABLATE, "--save-pruned", tmp_path / "pruned2.pt", "--remove", "2"]),
        # the recording of the same selection is accepted (every rank compares the whole selection)
        ("ablate_rec", ["ablate", MODEL, "--data", DATA, *COMMON, "--recording", tmp_path / "two.h5", "-f", "json"]),
        ("eval", ["eval", MODEL, "--data", DATA, *COMMON, "-f", "json"]),
        ("finetune", [*FINETUNE, "-b", "16", "--out", tmp_path / "ft2.pt"]),
    ]
    two = run_jobs(jobs, tmp_path)

    # record: same samples in the same order, statistics equal to 1e-5 (here: the same batches)
    ref_path = tmp_path / "one.h5"
    invoke("record", MODEL, "--data", DATA, *COMMON, "--out", ref_path)
    ref, got, res = open_recording(ref_path), open_recording(tmp_path / "two.h5"), open_recording(resumed)
    assert one_json(two["record"])["n_samples"] == 120 and one_json(two["resume"])["complete"]
    for other in (got, res):
        assert other.complete and np.array_equal(other.index, ref.index) and np.array_equal(other.label, ref.label)
        np.testing.assert_array_equal(other.pred, ref.pred)
        np.testing.assert_allclose(other.loss, ref.loss, rtol=1e-5, atol=1e-6)
        for name, values in ref.stats.items():
            np.testing.assert_allclose(other.stats[name], values, rtol=1e-5, atol=1e-6, equal_nan=True)

    # align MODEL (in memory): every figure
    assert_close(one_json(two["align"]), one_json(invoke("align", MODEL, "--data", DATA, *COMMON, "-f", "json").stdout),
                 1e-6)

    # ablate: every figure, the greedy order, the correlations, the pruned checkpoint
    ablate_one = one_json(invoke(*ABLATE, "--save-pruned", tmp_path / "pruned1.pt", "--remove", "2").stdout)
    ablate_two = one_json(two["ablate"])
    assert [p["removed"] for p in ablate_two["cumulative"]] == [p["removed"] for p in ablate_one["cumulative"]]
    ablate_one["pruned"]["path"] = ablate_two["pruned"]["path"] = None
    assert_close(ablate_two, ablate_one, 1e-9)
    rec_one = invoke("ablate", MODEL, "--data", DATA, *COMMON, "--recording", tmp_path / "two.h5", "-f", "json")
    assert_close(one_json(two["ablate_rec"]), one_json(rec_one.stdout), 1e-9)
    assert one_json(two["ablate_rec"])["proxies"]["source"] == str(tmp_path / "two.h5")
    a = torch.load(tmp_path / "pruned1.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "pruned2.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # eval
    assert_close(one_json(two["eval"]), one_json(invoke("eval", MODEL, "--data", DATA, *COMMON, "-f", "json").stdout),
                 1e-12)

    # finetune: 2 processes × 16 with --sync-bn = 1 process × 32 (train and validation loss)
    ft_two = one_json(two["finetune"])
    ft_one = one_json(invoke(*FINETUNE, "-b", "32", "--out", tmp_path / "ft1.pt").stdout)
    assert (ft_two["world_size"], ft_two["global_batch_size"]) == (2, 32)
    assert (ft_one["world_size"], ft_one["global_batch_size"]) == (1, 32)
    assert ft_two["train_loss"] == pytest.approx(ft_one["train_loss"], rel=1e-4)
    assert ft_two["val"]["loss"] == pytest.approx(ft_one["val"]["loss"], rel=1e-4)
    w1 = torch.load(tmp_path / "ft1.pt", weights_only=True)["state_dict"]
    w2 = torch.load(tmp_path / "ft2.pt", weights_only=True)["state_dict"]
    for key in w1:
        if w1[key].is_floating_point():
            torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=1e-5)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def _assert_weights_close(got: Path, want: Path, rtol: float, atol: float) -> None:
    a, b = _weights(got), _weights(want)
    assert a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key


def _assert_same_weights(got: Path, want: Path) -> None:
    a, b = _weights(got), _weights(want)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# finetune on 96 training and 32 validation samples of the fixture, on the CPU.
SMALL_FT = ["finetune", MODEL, "--data", DATA, "--val-data", DATA, "--limit", "96", "--val-limit", "32", "--seed", "0",
            "--device", "cpu", "-f", "json", "--overwrite"]
# BatchNorm over the global batch is float64 sums on two processes and torch's float32 kernel on one:
# after a few SGD steps the two differ by rounding amplified through training, well below 1e-4.
BN_RTOL = 1e-4


def test_finetune_recalibrate_resume_accumulate_and_step_0_on_two_processes(tmp_path):
    """finetune on two processes against one process:

    - ``--recalibrate``: the images are split between the ranks in whole batches of 2 × 16 (rank 0
      the first 32, rank 1 the last 8) and the float64 sums all-reduced: the step-0 row (after
      recalibration) and the recalibrated best checkpoint equal a one-process run with batches of
      32 to float64 summation order;
    - the step-0 row equals ``eval`` of the starting model in one process (after the DDP wrap);
    - ``--accum-steps 2`` with 2 × 8 and ``--sync-bn`` equals one process with 16 and ``--accum-steps
      2`` (the same micro-batches: each BatchNorm call sees the same 16 samples);
    - a run stopped after step 2 and resumed by two processes equals the uninterrupted two-process
      run bit for bit, and one process × 32 to BatchNorm rounding;
    - ``share --recalibrate`` (not split: rank 0 alone, here while the script's process group is up)
      equals one process bit for bit.
    """
    t = tmp_path
    # --lr 5: the one step ruins the model, so PATH.best.pt is the recalibrated start in every run
    recal = [*SMALL_FT, "--recalibrate", "40", "--max-steps", "1", "--lr", "5"]
    accum = [*SMALL_FT, "--accum-steps", "2", "--sync-bn", "--max-steps", "3"]
    full = [*SMALL_FT, "--sync-bn", "--epochs", "2", "-b", "16"]  # 3 steps of 32 per epoch
    stopped = [a for a in full if a != "--overwrite"]
    share = ["share", MODEL, "--stages", "0", "--data", DATA, "--limit", "32", "--train-data", DATA,
             "--recalibrate", "40", "-b", "16", "--device", "cpu", "-f", "json"]
    jobs = [
        ("share", [*share, "--out", t / "shared2.pt"]),
        ("recal", [*recal, "-b", "16", "--out", t / "recal2.pt"], {"count_recalibration": True}),
        ("accum", [*accum, "-b", "8", "--out", t / "accum2.pt"]),
        ("full", [*full, "--out", t / "full2.pt"]),
        ("stopped", [*stopped, "--out", t / "resumed2.pt"], {"stop_after_step": 2}),
        ("resumed", [*stopped, "--resume", "--out", t / "resumed2.pt"]),
    ]
    two = run_jobs(jobs, t)

    # share --recalibrate: rank 0 alone, as one process
    share_two = one_json(two["share"])
    share_one = one_json(invoke(*share, "--out", t / "shared1.pt").stdout)
    share_two["out"] = share_one["out"] = None
    assert share_two == share_one and share_one["recalibrated"] == 40
    _assert_same_weights(t / "shared2.pt", t / "shared1.pt")

    # finetune --recalibrate: split between the ranks, batch 0 (32 images) on rank 0, batch 1 (8) on rank 1
    assert (t / "recal.rank0.recalibrated").read_text() == "32"
    assert (t / "recal.rank1.recalibrated").read_text() == "8"
    recal_two = one_json(two["recal"])
    recal_one = one_json(invoke(*recal, "-b", "32", "--out", t / "recal1.pt").stdout)  # batches of 2 × 16
    assert recal_two["recalibrated"] == recal_one["recalibrated"] == 40
    start_two, start_one = recal_two["history"][0], recal_one["history"][0]
    assert start_two["val_acc"] == start_one["val_acc"]
    # float64 sums of the statistics added in another order, rounded to float32: equal to 1 ulp or so
    assert start_two["val_loss"] == pytest.approx(start_one["val_loss"], rel=1e-6, abs=0)
    # PATH.best.pt is the recalibrated start: its buffers are one process's to float32 rounding
    assert recal_two["best_val"]["step"] == recal_one["best_val"]["step"] == 0
    _assert_weights_close(t / "recal2.best.pt", t / "recal1.best.pt", rtol=1e-6, atol=1e-7)

    # step 0 without --recalibrate = the starting model's one-process eval on the same 32 samples
    evaluated = one_json(invoke("eval", MODEL, "--data", DATA, "--limit", "32", "--seed", "0", "-b", "16",
                                "--device", "cpu", "-f", "json").stdout)
    start = one_json(two["full"])["history"][0]
    assert start["val_acc"] == evaluated["acc"]
    assert start["val_loss"] == pytest.approx(evaluated["loss"], rel=1e-12, abs=0)

    # --accum-steps: 2 processes × 8 × 2 micro-batches = 1 process × 16 × 2 micro-batches
    accum_two = one_json(two["accum"])
    accum_one = one_json(invoke(*accum, "-b", "16", "--out", t / "accum1.pt").stdout)
    assert (accum_two["world_size"], accum_two["global_batch_size"]) == (2, 32)
    assert accum_one["global_batch_size"] == 32
    assert_close(accum_two["history"], accum_one["history"], BN_RTOL)
    _assert_weights_close(t / "accum2.pt", t / "accum1.pt", BN_RTOL, 1e-5)

    # --resume on two processes: bit for bit the uninterrupted two-process run
    stopped_two = one_json(two["stopped"])
    assert not stopped_two["complete"] and stopped_two["steps"] == 2
    resumed_two, full_two = one_json(two["resumed"]), one_json(two["full"])
    assert resumed_two["complete"] and resumed_two["steps"] == full_two["steps"] == 6
    assert resumed_two["history"] == full_two["history"]
    _assert_same_weights(t / "resumed2.pt", t / "full2.pt")
    _assert_same_weights(t / "resumed2.best.pt", t / "full2.best.pt")
    # ... and one process × 32, to BatchNorm rounding
    full_one = one_json(invoke(*[a if a != "16" else "32" for a in full], "--out", t / "full1.pt").stdout)
    assert_close(resumed_two["history"], full_one["history"], BN_RTOL)
    _assert_weights_close(t / "resumed2.pt", t / "full1.pt", BN_RTOL, 1e-5)


def test_rank_0_shows_rank_1s_warning_and_reads_hdf5_through_for_every_rank(tmp_path):
    """A palette PNG with byte transparency makes PIL warn while it is converted to RGB: the image is
    in a batch of rank 1 alone, and rank 0 shows rank 1's warning once, as one process shows it.
    ``align RUN.h5`` on two processes: the recording (from another process) is read through by a
    child once, on rank 0. ``record`` of a model that makes NaN in every batch (on both ranks): one
    warning, the one one process gives (every rank's batches, in order)."""
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (32, 32), (40 * i, 80, 120)).save(tmp_path / "imgs" / cls / f"{i}.png")
    palette = Image.new("P", (32, 32), 3)
    palette.putpalette([v % 256 for v in range(768)])
    palette.save(tmp_path / "imgs" / "b" / "3.png", transparency=bytes(range(256)))  # sample 7: batch 3, rank 1
    args = ["eval", MODEL, "--data", tmp_path / "imgs", "-b", "2", "--workers", "0", "--device", "cpu", "-f", "json"]
    recording = tmp_path / "run.h5"
    invoke("record", MODEL, "--data", DATA, "--limit", "32", "-b", "16", "--device", "cpu", "--out", recording)
    checkpoint = torch.load(MODEL, weights_only=True)
    checkpoint["state_dict"]["layer2.1.bn2.running_var"][:] = -1.0  # sqrt of a negative: NaN from here on
    torch.save(checkpoint, tmp_path / "nan_model.pt")
    nan_record = ["record", tmp_path / "nan_model.pt", "--data", DATA, "--limit", "24", "-b", "4", "--device", "cpu",
                  "-f", "json", "--overwrite"]
    two = run_jobs([("eval", args), ("align", ["align", recording, "-f", "json"], {"count_hdf5_probes": True}),
                    ("nan", [*nan_record, "--out", tmp_path / "nan2.h5"])], tmp_path)
    nan_one = invoke(*nan_record, "--out", tmp_path / "nan1.h5").stderr
    expected_nan = [line for line in nan_one.splitlines() if "NaN or inf" in line]
    assert len(expected_nan) == 1 and "24 samples" in expected_nan[0]
    assert [line for line in two["(stderr)"].splitlines() if "NaN or inf" in line] == expected_nan
    assert [(tmp_path / f"align.rank{r}.probes").read_text() for r in (0, 1)] == ["1", "0"]
    assert_close(one_json(two["align"]), one_json(invoke("align", recording, "-f", "json").stdout), 0.0)
    one = invoke(*args)
    expected = [line for line in one.stderr.splitlines() if "Palette images" in line]
    assert len(expected) == 1 and expected[0].startswith("warning:")
    assert [line for line in two["(stderr)"].splitlines() if "Palette images" in line] == expected
    assert_close(one_json(two["eval"]), one_json(one.stdout), 1e-12)


def test_cli_reports_once_and_one_process_resumes_a_two_process_run(tmp_path):
    """The command line itself (``torchrun -m resprobe``): exactly one JSON report on stdout, no
    warnings twice; then one process finishes a two-process run that stopped with gaps."""
    out = tmp_path / "run.h5"
    done = torchrun("-m", "resprobe", "align", MODEL, "--data", DATA, *COMMON, "--out", out, "-f", "json",
                    cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    two = one_json(done.stdout)
    one = one_json(invoke("align", MODEL, "--data", DATA, *COMMON, "-f", "json").stdout)
    assert_close(two, one, 1e-6)
    warnings_seen = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings_seen) == len(set(warnings_seen))

    # A run stopped with gaps, as a two-process run leaves one (batches 1, 4 and 7 missing).
    ref = open_recording(out)
    partial = partial_run(tmp_path, "again.h5", batches=6)
    for k in (1, 4):
        (partial_dir(partial) / f"batch-{k:06d}.npz").unlink()
    invoke("record", "--out", partial, "--resume", "--device", "cpu")
    again = open_recording(partial)
    assert again.complete and np.array_equal(again.index, ref.index)
    for name, values in ref.stats.items():
        np.testing.assert_allclose(again.stats[name], values, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_a_failing_rank_ends_every_rank_with_one_line(tmp_path):
    """A corrupt image in rank 1's batch: exit status 1, one ``error:`` line, no hang."""
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (32, 32), (40 * i, 80, 120)).save(tmp_path / "imgs" / cls / f"{i}.png")
    (tmp_path / "imgs" / "b" / "3.png").write_bytes(b"not a png")  # sample 7: batch 3 of 2, on rank 1
    start = time.monotonic()
    done = torchrun("-m", "resprobe", "record", MODEL, "--data", tmp_path / "imgs", "-b", "2", "--workers", "0",
                    "--device", "cpu", "--out", tmp_path / "bad.h5", cwd=tmp_path)
    assert done.returncode == 1
    ours = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and "3.png" in ours[0], done.stderr[-3000:]
    assert done.stdout == ""
    assert time.monotonic() - start < LAUNCH_TIMEOUT


def _launch_one_job(tmp: Path, name: str, args: list, settings: dict) -> subprocess.CompletedProcess:
    spec = tmp / f"{name}.json"
    spec.write_text(json.dumps({"dir": str(tmp), "jobs": [[name, [str(a) for a in args], settings]]}))
    return torchrun(str(HERE / "distributed_worker.py"), str(spec), cwd=tmp)


def test_an_error_every_rank_hits_is_printed_once_even_when_rank_0_is_late(tmp_path):
    """A missing checkpoint fails on both ranks; rank 0 gets there 4 s after rank 1 (a busy machine),
    later than any fixed grace: still one line, printed by rank 0. Then an error only rank 1 hits
    before the ranks diverge (loading the model) is shown, once."""
    done = _launch_one_job(tmp_path, "missing", ["eval", tmp_path / "nope.pt", "--data", DATA, "--limit", "8",
                                                 "--device", "cpu"], {"delay_rank_0": 4})
    assert done.returncode == 0, done.stderr[-3000:]  # the worker goes on after a failed job
    assert [(tmp_path / f"missing.rank{r}.code").read_text() for r in (0, 1)] == ["1", "1"]
    ours = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert ours == [f"error: checkpoint not found: {tmp_path / 'nope.pt'}"], done.stderr[-3000:]

    alone = _launch_one_job(tmp_path, "rank1", ["eval", MODEL, "--data", DATA, "--limit", "8", "--device", "cpu"],
                            {"fail_open_on_rank": 1, "exit_on_error": True})
    assert alone.returncode == 1
    ours = [line for line in alone.stderr.splitlines() if line.startswith("error:")]
    assert ours == ["error: cannot load the model on rank 1"], alone.stderr[-3000:]


# --------------------------------------------------------------------------------------------------
# The pieces, without processes


def test_batches_go_whole_to_ranks_and_merge_back_in_order():
    n, b = 103, 10
    worlds = [distributed.World(r, 3) for r in range(3)]
    shards = [distributed.shard_positions(n, b, w) for w in worlds]
    assert sorted(p for s in shards for p in s) == list(range(n))
    assert shards[1][:10] == list(range(10, 20)) and shards[0][10:20] == list(range(30, 40))
    batches = [[list(range(n))[r.start:r.stop] for r in distributed.batch_ranges(n, b)][k::3] for k in range(3)]
    merged = distributed.merge_in_order(batches, 11)
    assert [p for batch in merged for p in batch] == list(range(n))
    assert distributed.world_from_env({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"}) == distributed.World(2, 4, 0)
    assert distributed.world_from_env({}) == distributed.World()
    assert not distributed.World().distributed and distributed.all_reduce_sums([1.5, 2]) == [1.5, 2.0]


def test_light_augmentation_depends_on_the_sample_not_the_batch():
    """Each sample's flip and padded crop come from (seed, epoch, index): the same in any batch, and
    always one of the flips/shifts of the light augmentation (checked against numpy)."""
    from resprobe.train import light_augment_samples

    images = torch.randn(8, 3, 16, 16)
    index = torch.arange(100, 108)
    together = light_augment_samples(images, seed=5, epoch=2, indices=index)
    apart = torch.cat([light_augment_samples(images[i:i + 1], 5, 2, index[i:i + 1]) for i in range(8)])
    assert torch.equal(together, apart)
    assert not torch.equal(together, light_augment_samples(images, 5, 3, index))  # another epoch, other draws
    pad = 16 // 8
    for x, y in zip(images.numpy(), together.numpy()):
        candidates = []
        for flipped in (x, x[:, :, ::-1]):
            padded = np.pad(flipped, ((0, 0), (pad, pad), (pad, pad)))
            candidates += [padded[:, dy:dy + 16, dx:dx + 16] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
        assert any(np.array_equal(y, c) for c in candidates)


def test_accumulated_step_equals_one_step_on_the_union():
    """--accum-steps: gradients of A micro-batches, each loss over A, equal one step on all of them
    (a model without BatchNorm; checked against a plain autograd step on the union)."""
    from resprobe.runtime import make_runtime
    from resprobe.train import make_scheduler, train_step

    torch.manual_seed(0)
    images, labels = torch.randn(12, 3, 4, 4), torch.randint(0, 5, (12,))
    models = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
              for _ in range(3)]
    for model in models[1:]:
        model.load_state_dict(models[0].state_dict())
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) for model in models]
    schedulers = [make_scheduler(opt, 10, 0) for opt in optimizers]
    runtime = make_runtime("cpu")
    for _ in range(2):  # two steps: the momentum buffer and the schedule take part
        # by hand: the mean loss over all 12 samples, one backward, one step
        optimizers[0].zero_grad()
        whole = torch.nn.functional.cross_entropy(models[0](images), labels)
        whole.backward()
        optimizers[0].step()
        schedulers[0].step()
        parts = train_step(models[1], [(images[i:i + 4], labels[i:i + 4]) for i in (0, 4, 8)], runtime,
                           optimizers[1], schedulers[1], None)
        one = train_step(models[2], [(images, labels)], runtime, optimizers[2], schedulers[2], None)
        assert float(parts) == pytest.approx(float(whole.detach()), rel=1e-6)
        assert torch.equal(one, whole.detach())  # one micro-batch: the same arithmetic as by hand
        for a, b, c in zip(models[0].parameters(), models[1].parameters(), models[2].parameters()):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)  # the sum of 3 parts is reassociated
            assert torch.equal(c, a)


def test_two_processes_record_one_network_when_the_model_has_no_weights(tmp_path):
    """A model without weights is built from --seed on every rank: images 8-15 repeat 0-7, and rank 0
    records the first half while rank 1 records the second, so their losses agree only if both ranks
    ran the same network (before, each rank drew its own: the duplicates differed)."""
    with np.load(DATA) as f:
        images, labels = f["images"][:8], f["labels"][:8]
    dup = tmp_path / "dup.npz"
    np.savez(dup, images=np.concatenate([images, images]), labels=np.concatenate([labels, labels]))
    kwargs = json.dumps({"layers": [1, 1, 1, 1], "channels": [8, 16, 16, 32], "stem_width": 4,
                         "zero_init_last": False})
    out = tmp_path / "dup.h5"
    done = torchrun("-m", "resprobe", "record", "timm:resnet18", "--num-classes", "4", "--model-kwargs", kwargs,
                    "--input-size", "32", "--data", dup, "-b", "8", "--device", "cpu", "--out", out, "-f", "json",
                    "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    recorded = open_recording(out)
    assert recorded.complete and list(recorded.index) == list(range(16))
    np.testing.assert_allclose(recorded.loss[8:], recorded.loss[:8], rtol=0, atol=1e-6)
    assert one_json(done.stdout)["weights_sha256"] == recorded.attrs["weights_sha256"]
