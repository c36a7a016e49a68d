"""torchrun with a language model: two gloo processes give what one process gives (record, align in
memory, eval)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers")

from conftest import invoke  # noqa: E402
from test_distributed import one_json, run_jobs  # noqa: E402
from tinylms import save_model, write_text  # noqa: E402

from resprobe.recording.reader import open_recording

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_two_processes_equal_one_on_a_language_model(tmp_path):
    model = save_model(tmp_path / "tiny-llama", "llama")
    text = write_text(tmp_path / "doc.txt", repeats=2)
    common = ["--data", f"text:{text}", "--seq-len", "16", "--limit", "9", "-b", "2", "--device", "cpu",
              "--skip-tokens", "1", "-q", "-f", "json"]
    outputs = run_jobs([("record", ["record", str(model), *common, "--out", str(tmp_path / "two.h5")]),
                        ("align", ["align", str(model), *common, "--granularity", "sublayer"]),
                        ("eval", ["eval", str(model), *[a for a in common if a not in ("--skip-tokens", "1")]])],
                       tmp_path)
    invoke("record", model, *common, "--out", tmp_path / "one.h5")
    one, two = open_recording(tmp_path / "one.h5"), open_recording(tmp_path / "two.h5")
    assert list(two.index) == list(one.index) and two.complete
    for name, values in one.stats.items():
        np.testing.assert_allclose(two.stats[name], values, rtol=1e-5, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(two.loss, one.loss, rtol=1e-6)
    align_one = json.loads(invoke("align", model, *common, "--granularity", "sublayer").stdout)
    align_two = one_json(outputs["align"])
    for a, b in zip(align_two["blocks"], align_one["blocks"]):
        assert a["token_cos_mean"] == pytest.approx(b["token_cos_mean"], rel=1e-5)
    assert align_two["n_tokens"] == align_one["n_tokens"]
    eval_one = json.loads(invoke("eval", model, *[a for a in common if a not in ("--skip-tokens", "1")]).stdout)
    eval_two = one_json(outputs["eval"])
    assert eval_two["n_tokens"] == eval_one["n_tokens"] and eval_two["n"] == eval_one["n"]
    assert eval_two["loss"] == pytest.approx(eval_one["loss"], rel=1e-6)


def test_two_processes_ablate_a_language_model_as_one(tmp_path):
    model = save_model(tmp_path / "tiny-llama", "llama")
    text = write_text(tmp_path / "doc.txt", repeats=2)
    args = ["ablate", str(model), "--data", f"text:{text}", "--seq-len", "16", "--limit", "9", "-b", "2",
            "--device", "cpu", "-q", "-f", "json", "--cumulative", "2", "--spans", "2", "--proxies"]
    two = one_json(run_jobs([("ablate", args)], tmp_path)["ablate"])
    one = json.loads(invoke(*args).stdout)
    assert two["n"] == one["n"] and two["baseline"]["n_tokens"] == one["baseline"]["n_tokens"]
    for section in ("blocks", "cumulative", "spans"):
        for a, b in zip(two[section], one[section]):
            assert a.get("name", a.get("removed")) == b.get("name", b.get("removed"))
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    for a, b in zip(two["proxies"]["blocks"], one["proxies"]["blocks"]):
        for key in ("bi", "angular", "angular_last", "taylor", "cos"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9), key
