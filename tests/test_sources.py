"""ImageNet-style data: flat folders with --labels, tars of image folders, hfds: (resprobe.sources)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import MODEL, invoke

from resprobe.data import Preprocessing, open_data
from resprobe.errors import DataError

pytestmark = pytest.mark.usefixtures("one_thread")

PRE = Preprocessing(input_size=(3, 32, 32))


def imagenet_wnids() -> list[str]:
    from timm.data import ImageNetInfo

    return list(ImageNetInfo().label_names())


def save_image(path: Path, seed: int, size: int = 32) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, quality=95)


def fake_devkit(data_dir: Path, ids: list[int]) -> dict[int, str]:
    """The devkit's data/ folder: meta.mat (ILSVRC2012_ID → wnid, in an order other than sorted wnids,
    as the real one is) and the ground truth file with ``ids``."""
    from scipy.io import savemat

    wnids = imagenet_wnids()
    order = list(np.random.default_rng(1).permutation(len(wnids)))
    table = {i + 1: wnids[j] for i, j in enumerate(order)}
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    rows = [(i, w, "x", 0) for i, w in table.items()] + [(1001, "n00001740", "entity", 3)]
    data_dir.mkdir(parents=True, exist_ok=True)
    savemat(str(data_dir / "meta.mat"), {"synsets": np.array(rows, dtype=dtype)})
    (data_dir / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{i}\n" for i in ids))
    return table


def labels_by_name(source) -> dict[str, int]:
    base = source.dataset.base
    return {Path(p).name: label for p, label in base.samples}


def test_devkit_ground_truth_maps_ids_through_meta_mat(tmp_path):
    ids = [490, 361, 171, 822, 297, 482]
    table = fake_devkit(tmp_path / "devkit" / "data", ids)
    names = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 7)]
    for n, name in enumerate(names):
        save_image(tmp_path / "val" / name, n)
        save_image(tmp_path / "byclass" / table[ids[n]] / name, n)  # the same images as wnid class folders
    flat = open_data(str(tmp_path / "val"), PRE, 1000,
                     labels=str(tmp_path / "devkit" / "data" / "ILSVRC2012_validation_ground_truth.txt"))
    folders = open_data(str(tmp_path / "byclass"), PRE, 1000)  # ImageFolder, wnids → ImageNet indices
    assert labels_by_name(flat) == labels_by_name(folders)
    wnids = imagenet_wnids()
    assert labels_by_name(flat)[names[0]] == wnids.index(table[ids[0]])


def test_devkit_order_follows_the_file_numbers_when_only_some_files_are_present(tmp_path):
    ids = [5, 6, 7, 8, 9]
    table = fake_devkit(tmp_path / "data", ids)
    for number in (2, 5):
        save_image(tmp_path / "val" / f"ILSVRC2012_val_{number:08d}.JPEG", number)
    flat = open_data(str(tmp_path / "val"), PRE, 1000, labels=str(tmp_path / "data" /
                                                                  "ILSVRC2012_validation_ground_truth.txt"))
    wnids = imagenet_wnids()
    assert labels_by_name(flat) == {"ILSVRC2012_val_00000002.JPEG": wnids.index(table[6]),
                                    "ILSVRC2012_val_00000005.JPEG": wnids.index(table[9])}


def test_devkit_without_meta_mat_is_one_clear_error(tmp_path):
    save_image(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG", 0)
    gt = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("1\n")
    result = invoke("eval", MODEL, "--data", tmp_path / "val", "--labels", gt, "--device", "cpu", code=1)
    assert result.stderr.count("\n") == 1 and "meta.mat" in result.stderr


def test_loc_val_solution_csv_and_plain_csv(tmp_path):
    wnids = imagenet_wnids()
    picks = [wnids[7], wnids[0], wnids[999]]
    rows = ["ImageId,PredictionString"]
    for n, wnid in enumerate(picks):
        save_image(tmp_path / "val" / f"ILSVRC2012_val_{n + 1:08d}.JPEG", n)
        rows.append(f"ILSVRC2012_val_{n + 1:08d},{wnid} 10 20 30 40 {wnid} 1 2 3 4")
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    loc = open_data(str(tmp_path / "val"), PRE, 1000, labels=str(tmp_path / "LOC_val_solution.csv"))
    assert sorted(labels_by_name(loc).values()) == [0, 7, 999]
    assert labels_by_name(loc)["ILSVRC2012_val_00000001.JPEG"] == 7
    (tmp_path / "plain.csv").write_text("file,label\nILSVRC2012_val_00000001.JPEG,3\nILSVRC2012_val_00000002.JPEG,"
                                        f"{wnids[5]}\nILSVRC2012_val_00000003.JPEG,0\n")
    plain = open_data(str(tmp_path / "val"), PRE, 1000, labels=str(tmp_path / "plain.csv"))
    assert [label for _, label in plain.samples] == [3, 5, 0]
    (tmp_path / "short.csv").write_text("ILSVRC2012_val_00000001.JPEG,3\n")
    with pytest.raises(DataError, match="no label for 2 image"):
        open_data(str(tmp_path / "val"), PRE, 1000, labels=str(tmp_path / "short.csv"))


def make_class_folder(root: Path) -> Path:
    """Class and file names whose natural order (timm's tar reader) differs from the plain one (ImageFolder)."""
    seed = 0
    for cls in ("class2", "class10"):
        for name in ("img1.png", "img10.jpg", "img2.jpg"):
            save_image(root / cls / name, seed)
            seed += 1
    return root


def test_a_tar_of_an_image_folder_gives_the_same_eval_and_recording_as_the_folder(tmp_path):
    folder = make_class_folder(tmp_path / "images")
    with tarfile.open(tmp_path / "images.tar", "w") as tar:
        tar.add(folder, arcname="images")
    common = ["--device", "cpu", "--workers", "0", "-f", "json", "--batch-size", "4"]
    results = [json.loads(invoke("eval", MODEL, "--data", d, *common).stdout) for d in (folder, tmp_path / "images.tar")]
    for key in ("n", "loss", "acc", "top5"):
        assert results[0][key] == results[1][key]
    sources = [open_data(d, PRE, 10) for d in (str(folder), str(tmp_path / "images.tar"))]
    for i in range(len(sources[0])):  # the same samples in the same order: --limit picks the same ones
        image_f, label_f, _ = sources[0].dataset[i]
        image_t, label_t, _ = sources[1].dataset[i]
        assert label_f == label_t and bool((image_f == image_t).all())
    assert [label for _, label, _ in sources[1].dataset] == [0, 0, 0, 1, 1, 1]  # class10 < class2, as ImageFolder


def test_hfds_without_the_datasets_package_is_one_line(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    result = invoke("eval", MODEL, "--data", "hfds:timm/mini-imagenet:validation", "--device", "cpu", code=1)
    assert result.stderr.strip() == ("error: --data hfds:timm/mini-imagenet:validation: Hugging Face datasets need "
                                     "the 'datasets' package: pip install 'resprobe[hf]'")


def test_labels_only_for_folders(tmp_path, arrays_file):
    (tmp_path / "l.csv").write_text("a.jpg,1\n")
    result = invoke("eval", MODEL, "--data", arrays_file(), "--labels", tmp_path / "l.csv", "--device", "cpu", code=1)
    assert "--labels" in result.stderr and result.stderr.count("\n") == 1
