"""``resprobe plot``: every figure kind renders to a valid PNG / SVG; bad inputs end in one line.

The alignment figure comes from a real recording of the shipped tiny ResNet (with the last-stage
readout); the ablate figure from a hand-made JSON of the documented shape (docs/reference.md), with a
cumulative curve, proxies and a transition block.
"""

from __future__ import annotations

import json
import struct
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import DATA, MODEL, invoke
from resprobe.errors import BadValue

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def recording(fixture_run) -> tuple[Path, dict]:
    """A real recording with readout (64 samples of the fixture), and its align JSON (made once per
    test run: conftest's ``fixture_run``)."""
    return fixture_run


def ablate_payload(cumulative: bool = True, proxies: bool = True) -> dict:
    names = [("layer1.0", 0, "identity"), ("layer1.1", 0, "identity"), ("layer2.0", 1, "transition"),
             ("layer2.1", 1, "identity"), ("layer3.0", 2, "transition"), ("layer3.1", 2, "identity")]
    deltas = [0.04, 0.008, 0.09, 0.19, 0.05, -0.001]
    ranks = [4, 5, 2, 1, 3, 6]
    payload: dict = {
        "model": "fixtures/tiny_resnet.pt", "n": 256, "baseline": {"loss": 0.297, "acc": 0.887, "top5": None},
        "blocks": [{"name": n, "stage": s, "index": i, "kind": k, "loss": 0.297 + d, "acc": 0.887 - d / 5,
                    "delta_loss": d, "delta_acc": -d / 5, "rank": r}
                   for i, ((n, s, k), d, r) in enumerate(zip(names, deltas, ranks))],
    }
    if cumulative:
        payload["cumulative"] = [
            {"k": 1, "removed": ["layer3.1"], "loss": 0.296, "acc": 0.89},
            {"k": 2, "removed": ["layer3.1", "layer1.1"], "loss": 0.31, "acc": 0.88},
            {"k": 3, "removed": ["layer3.1", "layer1.1", "layer1.0"], "loss": 0.38, "acc": 0.85},
        ]
        payload["cumulative_mode"] = "greedy"
    if proxies:
        payload["proxies"] = {
            "blocks": [{"name": n, "bi": 0.01 * (j + 1), "angular": 0.03 * (j + 1), "l2_ratio": 0.2 + 0.01 * j,
                        "cos": None if k == "transition" else -0.05 * j, "taylor": 0.02 * j}
                       for j, (n, _, k) in enumerate(names)],
            "correlation": {"bi": {"spearman": 0.5, "kendall": 0.4}, "angular": {"spearman": 0.5, "kendall": 0.4},
                            "l2_ratio": {"spearman": 0.5, "kendall": 0.4}, "cos": {"spearman": -0.8, "kendall": -0.6},
                            "taylor": {"spearman": 0.7, "kendall": 0.5}},
        }
    return payload


def write_json(path: Path, payload: dict) -> Path:
    path.write_text(json.dumps(payload))
    return path


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def svg_text(path: Path) -> str:
    """All text of an SVG (which must parse as XML)."""
    root = ET.parse(path).getroot()
    assert root.tag.endswith("svg")
    return " ".join(t for node in root.iter() for t in (node.text, node.tail) if t)


def assert_sensible_png(path: Path) -> None:
    width, height = png_size(path)
    assert 900 <= width <= 3000 and 500 <= height <= 3000, (width, height)
    assert 20_000 < path.stat().st_size < 2_000_000


# -- figures ------------------------------------------------------------------------------------------


def test_alignment_png_from_a_recording(recording, tmp_path):
    run, payload = recording
    out = tmp_path / "align.png"
    report = json.loads(invoke("plot", str(run), "--out", str(out), "-f", "json").stdout)
    assert report == {"out": str(out), "kind": "align",
                      "panels": ["cosine", "l2_ratio", "removal_estimate", "readout", "borderline"]}
    assert_sensible_png(out)
    assert [p.name for p in tmp_path.iterdir()] == ["align.png"]  # no temporary file left behind


def test_alignment_svg_from_align_json_names_every_block(recording, tmp_path):
    _, payload = recording
    payload = {k: v for k, v in payload.items() if k != "readout"}
    out = tmp_path / "align.svg"
    report = json.loads(invoke("plot", str(write_json(tmp_path / "a.json", payload)), "-o", str(out),
                               "-f", "json").stdout)
    assert report["kind"] == "align" and report["panels"] == ["cosine", "l2_ratio", "removal_estimate"]
    text = svg_text(out)
    for block in payload["blocks"]:
        assert block["name"] in text
    for label in ("stage 0", "stage 3", "transition block", "relative size", "n = 64 samples",
                  "removal estimate", "removal hurts"):
        assert label in text
    # the same input gives the same bytes (no dates, fixed ids)
    again = tmp_path / "again.svg"
    invoke("plot", str(tmp_path / "a.json"), "-o", str(again), "-q")
    assert again.read_bytes() == out.read_bytes()


def test_alignment_from_older_json_draws_the_removal_estimate_from_first_order_mean(recording, tmp_path):
    """JSON written before ``removal_estimate_mean`` existed: the panel shows −first_order_mean; JSON
    with neither (hand-made) gets the two cosine/ratio panels only."""
    from resprobe.render.plot import removal_estimates

    _, payload = recording
    old = [{k: v for k, v in b.items() if k != "removal_estimate_mean"} for b in payload["blocks"]]
    expected = [None if b["first_order_mean"] is None else -b["first_order_mean"] for b in payload["blocks"]]
    got = removal_estimates(old)
    assert [None if g != g else float(g) for g in got] == expected
    bare = [{k: v for k, v in b.items() if k not in ("removal_estimate_mean", "first_order_mean")}
            for b in payload["blocks"]]
    out = tmp_path / "bare.svg"
    report = json.loads(invoke("plot", str(write_json(tmp_path / "b.json", {**payload, "blocks": bare,
                                                                          "readout": None})),
                               "-o", str(out), "-f", "json").stdout)
    assert report["panels"] == ["cosine", "l2_ratio"]


def test_readout_figure_alone(recording, tmp_path):
    run, payload = recording
    out = tmp_path / "readout.svg"
    report = json.loads(invoke("plot", str(run), "-o", str(out), "--kind", "readout", "-f", "json").stdout)
    assert report["kind"] == "readout" and report["panels"] == ["readout", "borderline"]
    text = svg_text(out)
    for row in payload["readout"]:
        assert row["name"] in text
    assert "borderline (|margin| < 0.1" in text and "top-1 accuracy" in text and "corrected" in text
    assert "layer1.0" not in text  # only the last stage


def test_unfinished_recording_is_drawn_and_marked(tmp_path):
    """A run stopped mid-way: RUN.h5 does not exist yet, its partial folder does."""
    from resprobe.record import RecordOptions, record
    from resprobe.recording.reader import partial_dir

    class Stop(Exception):
        pass

    def stop_after_two_batches(done: int, total: int) -> None:
        if done >= 16:
            raise Stop

    run = tmp_path / "run.h5"
    with pytest.raises(Stop):
        record(RecordOptions(model=MODEL, data=DATA, limit=40, batch_size=8), run, device="cpu",
               progress=stop_after_two_batches)
    assert not run.exists() and partial_dir(run).is_dir()
    out = tmp_path / "partial.svg"
    result = invoke("plot", str(run), "-o", str(out), "-f", "json")
    assert json.loads(result.stdout)["kind"] == "align"
    assert "incomplete" in result.stderr  # the warning of align_report
    assert "INCOMPLETE recording" in svg_text(out)


def test_align_json_from_stdin(recording, tmp_path):
    _, payload = recording
    out = tmp_path / "stdin.png"
    result = invoke("plot", "-", "-o", str(out), "-f", "json", stdin=json.dumps(payload))
    assert json.loads(result.stdout)["panels"][-1] == "borderline"
    assert_sensible_png(out)


def test_ablate_png_and_svg_with_curve_and_proxies(tmp_path):
    source = write_json(tmp_path / "ablate.json", ablate_payload())
    png, svg = tmp_path / "ablate.png", tmp_path / "ablate.svg"
    report = json.loads(invoke("plot", str(source), "-o", str(png), "-f", "json").stdout)
    assert report == {"out": str(png), "kind": "ablate",
                      "panels": ["delta_loss", "delta_acc", "cumulative", "proxies"]}
    assert_sensible_png(png)
    invoke("plot", str(source), "-o", str(svg), "-q")
    text = svg_text(svg)
    for name in ("layer1.0", "layer2.0", "layer3.1"):
        assert name in text
    for label in ("0: intact", "1: layer3.1", "2: layer1.1", "3: layer1.0", "greedy"):  # removal order named
        assert label in text
    for label in ("ρ = +0.50", "τ = +0.40", "ρ = −0.80", "τ = −0.60"):  # typographic minus
        assert label in text
    assert "#1" in text  # the most harmful removal is marked


@pytest.mark.parametrize("cos", [[-0.0061, -0.004, None, -0.0001, None, -0.003],  # the trial's ResNet-20 range
                                 [-0.00061, 0.00003, None, -0.0002, None, -0.0004]])
def test_proxy_panels_labels_do_not_run_together(cos):
    """The narrowest ablate figure (6 blocks: 7 inches for five proxy panels): measured on the drawn
    figure, no two tick labels of a panel overlap, and the axis titles neither touch nor leave it."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from resprobe.render.plot import STYLE, ablate_figure

    payload = ablate_payload(cumulative=False)
    for row, value in zip(payload["proxies"]["blocks"], cos):
        row["cos"] = value
    with matplotlib.rc_context(STYLE):
        fig, _ = ablate_figure(payload)
        FigureCanvasAgg(fig).draw()
        renderer = fig.canvas.get_renderer()
        axes = fig.subfigs[-1].axes
        assert len(axes) == 5
        for ax in axes:
            lo, hi = sorted(ax.get_xlim())
            shown = [t.get_window_extent(renderer) for t, v in zip(ax.get_xticklabels(), ax.get_xticks())
                     if lo <= v <= hi and t.get_text()]
            assert len(shown) >= 2, ax.get_xlabel()
            for left, right in zip(shown, shown[1:]):
                assert left.x1 + 2 < right.x0, (ax.get_xlabel(), [t.get_text() for t in ax.get_xticklabels()])
        titles = [ax.xaxis.label.get_window_extent(renderer) for ax in axes]
        for left, right in zip(titles, titles[1:]):
            assert left.x1 + 4 < right.x0  # at least 4 pixels (at 100 dpi) between neighbouring axis titles
        assert titles[0].x0 >= fig.bbox.x0 and titles[-1].x1 <= fig.bbox.x1


def test_ablate_without_optional_parts(tmp_path):
    source = write_json(tmp_path / "ablate.json", ablate_payload(cumulative=False, proxies=False))
    report = json.loads(invoke("plot", str(source), "-o", str(tmp_path / "a.png"), "-f", "json").stdout)
    assert report["panels"] == ["delta_loss", "delta_acc"]
    assert_sensible_png(tmp_path / "a.png")


def test_table_and_csv_reports(tmp_path):
    source = write_json(tmp_path / "ablate.json", ablate_payload(proxies=False))
    table = invoke("plot", str(source), "-o", str(tmp_path / "t.png")).stdout
    assert "t.png" in table and "ablate" in table
    csv = invoke("plot", str(source), "-o", str(tmp_path / "c.png"), "-f", "csv").stdout.splitlines()
    assert csv == ["out,kind,panels", f"{tmp_path / 'c.png'},ablate,delta_loss;delta_acc;cumulative"]


def test_shared_checkpoint_is_marked(recording, tmp_path):
    """A resprobe checkpoint with a share recipe: its stage is labelled shared, with its iterations."""
    import torch

    checkpoint = tmp_path / "shared.pt"
    torch.save({"format": "resprobe-checkpoint", "format_version": 1, "state_dict": {},
                "recipes": [{"kind": "share", "stages": [{"stage": 0, "blocks": ["layer1.1", "layer1.2"],
                                                          "iterations": ["layer1.1", "layer1.2"]}]}]}, checkpoint)
    _, payload = recording
    payload = {**payload, "model": str(checkpoint), "checkpoint": str(checkpoint)}
    out = tmp_path / "shared.svg"
    invoke("plot", str(write_json(tmp_path / "s.json", payload)), "-o", str(out), "-q")
    text = svg_text(out)
    assert "shared ×2" in text and "blocks are iterations" in text


# -- output rules and errors ---------------------------------------------------------------------------


def one_line_error(*args: str) -> str:
    result = invoke(*args, code=1)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert result.stdout == ""
    return lines[0]


def test_existing_file_needs_overwrite(tmp_path):
    source = write_json(tmp_path / "ablate.json", ablate_payload())
    out = tmp_path / "fig.png"
    out.write_bytes(b"keep me")
    assert "--overwrite" in one_line_error("plot", str(source), "-o", str(out))
    assert out.read_bytes() == b"keep me"
    invoke("plot", str(source), "-o", str(out), "--overwrite", "-q")
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ablate.json", "fig.png"]


@pytest.mark.parametrize("suffix", [".pdf", ".jpg", ""])
def test_wrong_suffix(tmp_path, suffix):
    source = write_json(tmp_path / "ablate.json", ablate_payload())
    assert ".png or .svg" in one_line_error("plot", str(source), "-o", str(tmp_path / f"fig{suffix}"))


def test_missing_input_and_missing_out(tmp_path):
    assert "not found" in one_line_error("plot", str(tmp_path / "nothing.json"), "-o", str(tmp_path / "f.png"))
    assert "not found" in one_line_error("plot", str(tmp_path / "nothing.h5"), "-o", str(tmp_path / "f.png"))
    assert "--out" in one_line_error("plot", str(tmp_path / "nothing.json"))
    source = write_json(tmp_path / "ablate.json", ablate_payload())
    assert "does not exist" in one_line_error("plot", str(source), "-o", str(tmp_path / "no" / "f.png"))


@pytest.mark.parametrize("content", ['{"a": 1}', "[1, 2]", '{"blocks": []}', "not json at all"])
def test_unknown_json(tmp_path, content):
    source = tmp_path / "x.json"
    source.write_text(content)
    message = one_line_error("plot", str(source), "-o", str(tmp_path / "f.png"))
    assert "JSON" in message
    assert not (tmp_path / "f.png").exists()


def test_binary_non_recording_input(tmp_path):
    assert "neither a recording nor a JSON" in one_line_error("plot", DATA, "-o", str(tmp_path / "f.png"))


def test_kind_that_the_input_cannot_give(recording, tmp_path):
    run, payload = recording
    source = write_json(tmp_path / "ablate.json", ablate_payload())
    assert "align" in one_line_error("plot", str(source), "-o", str(tmp_path / "f.png"), "--kind", "readout")
    assert "ablate" in one_line_error("plot", str(run), "-o", str(tmp_path / "f.png"), "--kind", "ablate")
    no_readout = write_json(tmp_path / "a.json", {k: v for k, v in payload.items() if k != "readout"})
    assert "--readout" in one_line_error("plot", str(no_readout), "-o", str(tmp_path / "f.png"), "--kind", "readout")
    assert "--kind" in one_line_error("plot", str(run), "-o", str(tmp_path / "f.png"), "--kind", "bars")


def test_missing_matplotlib_is_one_clear_error(tmp_path, monkeypatch):
    from resprobe.render.plot import plot

    source = write_json(tmp_path / "ablate.json", ablate_payload())
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    with pytest.raises(BadValue, match=r"resprobe\[plot\]"):
        plot(source, tmp_path / "f.png")
