"""The command line through typer's CliRunner: formats, exit codes, stdout only for the report."""

from __future__ import annotations

import csv
import io
import json

import pytest

from conftest import DATA, MODEL, invoke
from resprobe import __version__


def test_version(run):
    assert run("--version").stdout.strip() == f"resprobe {__version__}"


def test_blocks_json_and_csv(run):
    payload = json.loads(run("blocks", MODEL, "-f", "json").stdout)
    assert payload["params"] == 160012 and len(payload["blocks"]) == 10
    assert payload["blocks"][3] == {"name": "layer2.0", "stage": 1, "index": 0, "kind": "transition",
                                    "in_shape": [16, 8, 8], "out_shape": [24, 4, 4], "params": 9168}
    rows = list(csv.DictReader(io.StringIO(run("blocks", MODEL, "-f", "csv").stdout)))
    assert len(rows) == 10 and rows[0]["in_shape"] == "16x8x8"


def test_csv_joins_only_shapes_with_x():
    from resprobe.render.report import to_csv

    text = to_csv([{"name": "layer2.0", "in_shape": [16, 8, 8], "out_shape": [24, 4, 4], "cos_ci95": [-0.5, 0.25],
                    "removed": ["layer1.0", "layer1.1"], "values": [1, None, 2.5], "empty": [],
                    "nested": [[1, 2], {"a": 3}], "pre": {"mean": 0.5, "crop": None}}])
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows == [{"name": "layer2.0", "in_shape": "16x8x8", "out_shape": "24x4x4", "cos_ci95_lo": "-0.5",
                     "cos_ci95_hi": "0.25", "removed": "layer1.0;layer1.1", "values": "1;;2.5", "empty": "",
                     "nested": '[[1,2],{"a":3}]', "pre_mean": "0.5", "pre_crop": ""}]


def test_eval_json(run):
    payload = json.loads(run("eval", MODEL, "--data", DATA, "-f", "json", "--limit", "64").stdout)
    assert payload["n"] == 64 and 0 <= payload["acc"] <= 1 and payload["top5"] is None  # 4 classes


def test_align_direct_equals_recording(run, tmp_path):
    out = tmp_path / "run.h5"
    direct = json.loads(run("align", MODEL, "--data", DATA, "--limit", "48", "-f", "json").stdout)
    recorded = json.loads(run("record", MODEL, "--data", DATA, "--limit", "48", "--out", str(out), "-f", "json").stdout)
    assert recorded["complete"] and recorded["n_samples"] == 48 and recorded["out"] == str(out)
    from_file = json.loads(run("align", str(out), "-f", "json").stdout)
    assert from_file["blocks"] == direct["blocks"] and from_file["stages"] == direct["stages"]
    assert from_file["complete"] is True and from_file["n_samples"] == 48
    for key in ("model", "checkpoint", "data", "n_samples", "n_invalid", "complete", "blocks", "stages"):
        assert key in from_file
    fields = {"name", "stage", "index", "kind", "cos_mean", "cos_ci95", "frac_negative", "l2_ratio_mean",
              "update_cos_mean", "update_l2_ratio_mean", "branch_norm_mean", "grad_norm_mean", "first_order_mean",
              "removal_estimate_mean"}
    assert fields <= set(from_file["blocks"][0])
    rows = list(csv.DictReader(io.StringIO(run("align", str(out), "-f", "csv").stdout)))
    assert len(rows) == 10 and "cos_ci95_lo" in rows[0] and "cos_ci95_hi" in rows[0]
    for row, block in zip(rows, from_file["blocks"]):
        assert row["name"] == block["name"]
        if block["kind"] == "identity":
            assert float(row["removal_estimate_mean"]) == pytest.approx(-block["first_order_mean"], rel=1e-12)
        else:
            assert row["removal_estimate_mean"] == "" and block["removal_estimate_mean"] is None
    table = run("align", str(out)).stdout
    assert "layer4.1" in table and "per stage" in table
    assert "removal est." in table and "1st-order" not in table
    last = from_file["blocks"][-1]  # the table shows removal_estimate_mean with its sign, not first_order_mean
    line = next(t for t in table.splitlines() if t.strip().startswith(last["name"]))
    assert f"{last['removal_estimate_mean']:+.4f}" in line


def test_align_out_writes_recording(run, tmp_path):
    out = tmp_path / "a.h5"
    payload = json.loads(run("align", MODEL, "--data", DATA, "--limit", "16", "--out", str(out), "-f", "json").stdout)
    assert out.exists() and payload["n_samples"] == 16
    run("align", MODEL, "--data", DATA, "--limit", "16", "--out", str(out), code=1)  # exists: needs --overwrite


def test_errors_are_one_line(run):
    result = run("eval", MODEL, "--data", "/nonexistent/data.npz", code=1)
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    run("eval", MODEL, "--data", DATA, "--batch-size", "0", code=1)
    run("blocks", MODEL, "-f", "yaml", code=1)


def test_usage_errors_exit_2(run):
    run("blocks", code=2)
    run("blocks", MODEL, "--no-such-option", code=2)


# --------------------------------------------------------------------------------------------------
# The real process: Ctrl-C while starting, a reader that went away


def _process_env(extra_path: str | None = None) -> dict:
    import os

    from conftest import HERE, ROOT

    paths = [p for p in (extra_path, str(ROOT), str(HERE)) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1"}


SLOW_IMPORT = '''
import importlib.abc, sys, time

class SlowImport(importlib.abc.MetaPathFinder):
    """Says when MODULE starts importing, then takes its time (a cold disk), so Ctrl-C lands in it."""
    def find_spec(self, name, path=None, target=None):
        if name == "{module}":
            sys.meta_path.remove(self)
            sys.stderr.write("[importing {module}]\\n")
            sys.stderr.flush()
            time.sleep(60)
        return None

sys.meta_path.insert(0, SlowImport())
'''


@pytest.mark.slow
@pytest.mark.parametrize("module", ["typer", "torch"])  # the command line's own imports; a command's
def test_ctrl_c_while_importing_is_one_line_and_exit_130(tmp_path, module):
    import signal
    import subprocess
    import sys

    (tmp_path / "sitecustomize.py").write_text(SLOW_IMPORT.format(module=module))
    proc = subprocess.Popen([sys.executable, "-m", "resprobe", "blocks", MODEL], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_process_env(str(tmp_path)))
    try:
        assert proc.stderr.readline() == f"[importing {module}]\n"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and out == "" and err == "interrupted\n", err


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["json", "table"])  # the table goes through rich, which would exit(1) itself
def test_closed_stdout_ends_quietly(fmt):
    """``resprobe blocks ... | head -c0``: the reader is gone before the report is written. No message,
    exit status 141 (what a shell reports for a tool ended by SIGPIPE)."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "resprobe", "blocks", MODEL, "-f", fmt], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, env=_process_env(), timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr


def test_a_broken_pipe_that_is_not_stdout_is_still_an_error(monkeypatch):
    from resprobe import cli

    def broken(*_args, **_kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("resprobe.probe.open_probe", broken)
    result = invoke("blocks", MODEL, code=1)
    assert result.stderr.startswith("error: BrokenPipeError") and len(result.stderr.strip().splitlines()) == 1
    assert not cli.stdout_closed()  # CliRunner's stdout has no file descriptor


def test_ctrl_c_on_a_rank_other_than_0_adds_no_line(capsys, monkeypatch):
    """torchrun: only rank 0 says "interrupted"; the others end with 130 in silence, and ``main`` must
    not add its own line for them (it does for an interrupt no handler announced)."""
    import types

    import typer

    from resprobe import cli

    monkeypatch.setattr(cli._Announced, "interrupt", False)
    rank1 = types.SimpleNamespace(distributed=True, main=False)
    with pytest.raises(typer.Exit) as exit_info:
        with cli._errors_once(False, rank1):
            raise KeyboardInterrupt
    assert exit_info.value.exit_code == cli.EXIT_INTERRUPTED
    assert cli._Announced.interrupt and capsys.readouterr().err == ""


def test_align_of_a_readout_recording_reports_its_readout_without_the_flag(run, fixture_run):
    """The recording's choice counts (reference.md): `align RUN.h5` of a `--readout` recording shows the
    readout as `align RUN.h5 --readout` does, in JSON and in the table."""
    out, made = fixture_run
    plain = json.loads(run("align", str(out), "-f", "json").stdout)
    flagged = json.loads(run("align", str(out), "--readout", "-f", "json").stdout)
    assert plain["readout"] and plain["readout"] == flagged["readout"] == made["readout"]
    assert run("align", str(out)).stdout == run("align", str(out), "--readout").stdout


def test_user_text_is_printed_as_given_and_titles_do_not_wrap(run, tmp_path):
    """Paths, specs and names are shown literally (rich markup and emoji codes off: `[bold]` and `:100:`
    stay as typed), and a table's title is one line when stdout is not a terminal (CliRunner)."""
    import shutil

    data = tmp_path / "[bold]images:100:.npz"
    shutil.copyfile(DATA, data)
    result = run("eval", MODEL, "--data", data, "--limit", "16", "--device", "cpu")
    assert f"{MODEL} on {data}" in result.stdout.splitlines()[0]
    assert f"preprocessing of {data}:" in result.stderr
    assert "💯" not in result.stdout + result.stderr
    synthetic = run("eval", MODEL, "--data", "synthetic:100", "--limit", "16", "--device", "cpu")
    assert synthetic.stdout.splitlines()[0].strip() == f"{MODEL} on synthetic:100"
    assert "preprocessing of synthetic:100: " in synthetic.stderr


def test_progress_under_torchrun_counts_the_whole_run(monkeypatch):
    """Rank 0's callback counts its own share (here 2 of 3 batches of 16 over 40 samples, 2 processes):
    the bar is over the whole run's 40 samples and never passes them."""
    from rich.progress import Progress

    from resprobe import cli, distributed

    monkeypatch.setattr(distributed, "world", lambda: distributed.World(0, 2))
    with Progress(disable=True) as progress:
        task = progress.add_task("eval", total=40)
        advance = cli.run_advance(progress, task, 40)
        advance(16)
        assert progress.tasks[0].completed == 32
        advance(8)
        assert progress.tasks[0].completed == 40 and progress.tasks[0].total == 40
