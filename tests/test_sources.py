"""ImageNet-style data: flat folders with --labels, tars of image folders, hfds: (resprobe.data.sources)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MODEL, invoke
from test_setup_checks import NAMES, named_checkpoint

from resprobe.data.preprocessing import Preprocessing
from resprobe.data.specs import open_data
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


def test_devkit_ground_truth_follows_a_class_map(tmp_path):
    table = fake_devkit(tmp_path / "data", [5, 6])
    for number in (1, 2):
        save_image(tmp_path / "val" / f"ILSVRC2012_val_{number:08d}.JPEG", number)
    (tmp_path / "map.txt").write_text(f"{table[6]}\n{table[5]}\n")  # a 2-class model of these two wnids
    flat = open_data(str(tmp_path / "val"), PRE, 2, class_map=str(tmp_path / "map.txt"),
                     labels=str(tmp_path / "data" / "ILSVRC2012_validation_ground_truth.txt"))
    assert labels_by_name(flat) == {"ILSVRC2012_val_00000001.JPEG": 1, "ILSVRC2012_val_00000002.JPEG": 0}


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


# --------------------------------------------------------------------------------------------------
# hfds: a real Hugging Face dataset built on disk (no hub: local folders and a prepared hub cache)

HF_CLASSES = ["horizontal", "vertical", "diagonal", "disc"]  # the fixture model's 4 classes


@pytest.fixture
def hf_datasets(tmp_path, monkeypatch):
    """The ``datasets`` package, with its Arrow cache under tmp_path (its cache folder is read from
    ``datasets.config`` when a dataset is loaded)."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    bars_were_off = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    yield datasets
    if not bars_were_off:
        datasets.enable_progress_bars()


def hf_rows(n: int = 10, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """32×32 RGB pixels and labels in an order that is not sorted by class (rows keep their order)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.permutation(np.arange(n) % 4)


def write_hf_parquet(datasets, path: Path, pixels: np.ndarray, labels: np.ndarray, image_column: str = "image",
                     label_column: str = "label", class_names: list[str] | None = HF_CLASSES) -> Path:
    """A parquet file of PNG-encoded images (exact pixels) and labels, as the hub's datasets hold them."""
    from PIL import Image

    label_feature = datasets.ClassLabel(names=class_names) if class_names else datasets.Value("int64")
    features = datasets.Features({image_column: datasets.Image(), label_column: label_feature})
    table = datasets.Dataset.from_dict({image_column: [Image.fromarray(p) for p in pixels],
                                        label_column: [int(v) for v in labels]}, features=features)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(str(path))
    return path


def eval_json(*args: object) -> dict:
    return json.loads(invoke("eval", MODEL, *args, "--device", "cpu", "--workers", "0", "-b", "4", "-f", "json").stdout)


def test_hfds_parquet_folder_gives_the_eval_of_the_same_pixels_as_arrays(tmp_path, hf_datasets):
    pixels, labels = hf_rows()
    write_hf_parquet(hf_datasets, tmp_path / "ds" / "validation-00000-of-00001.parquet", pixels, labels)
    np.savez(tmp_path / "same.npz", images=pixels, labels=labels)  # the independent path: arrays, in row order
    through_hf, through_arrays = eval_json("--data", f"hfds:{tmp_path / 'ds'}"), eval_json("--data", tmp_path / "same.npz")
    assert through_hf["n"] == 10
    for key in ("loss", "acc", "top5"):
        assert through_hf[key] == through_arrays[key]
    # row by row: the dataset's row order, its labels, and the pixels normalized by hand
    source = open_data(f"hfds:{tmp_path / 'ds'}:validation", PRE, 4)
    assert source.class_names == HF_CLASSES and source.num_classes == 4 and source.image_size == (32, 32)
    for i in range(10):
        image, label, index = source.dataset[i]
        expected = (torch.from_numpy(pixels[i]).permute(2, 0, 1).float() / 255 - torch.tensor(PRE.mean).view(3, 1, 1)) \
            / torch.tensor(PRE.std).view(3, 1, 1)
        assert (label, index) == (int(labels[i]), i) and torch.allclose(image, expected, atol=1e-6)


def test_hfds_image_folder_and_saved_dataset_dict_equal_the_folder(tmp_path, hf_datasets):
    folder = make_class_folder(tmp_path / "images")  # class2, class10: ImageFolder sorts class10 first
    dataset = hf_datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
    hf_datasets.DatasetDict({"validation": dataset}).save_to_disk(str(tmp_path / "saved"))
    common = ["--device", "cpu", "--workers", "0", "-f", "json", "--batch-size", "4"]
    reference = json.loads(invoke("eval", MODEL, "--data", folder, *common).stdout)
    for spec in (f"hfds:{folder}:train", f"hfds:{tmp_path / 'saved'}"):
        result = json.loads(invoke("eval", MODEL, "--data", spec, *common).stdout)
        assert [result[k] for k in ("n", "loss", "acc", "top5")] == [reference[k] for k in ("n", "loss", "acc", "top5")]


def test_hfds_columns_img_and_integer_labels(tmp_path, hf_datasets):
    pixels, labels = hf_rows(6)
    write_hf_parquet(hf_datasets, tmp_path / "ds" / "validation.parquet", pixels, labels, image_column="img",
                     label_column="labels", class_names=None)
    source = open_data(f"hfds:{tmp_path / 'ds'}", PRE, 4)
    assert source.class_names is None and source.num_classes == int(labels.max()) + 1
    assert [source.dataset[i][1] for i in range(6)] == [int(v) for v in labels]
    sliced = open_data(f"hfds:{tmp_path / 'ds'}:validation[2:5]", PRE, 4)  # datasets' split slices
    assert [sliced.dataset[i][1] for i in range(len(sliced))] == [int(v) for v in labels[2:5]]


def test_hfds_class_map_and_class_count_note(tmp_path, hf_datasets):
    pixels, labels = hf_rows(8)
    write_hf_parquet(hf_datasets, tmp_path / "ds" / "validation.parquet", pixels, labels)
    (tmp_path / "map.json").write_text(json.dumps({"disc": 0, "diagonal": 1, "vertical": 2, "horizontal": 3}))
    mapped = open_data(f"hfds:{tmp_path / 'ds'}", PRE, 4, class_map=str(tmp_path / "map.json"))
    assert [mapped.dataset[i][1] for i in range(8)] == [3 - int(v) for v in labels]
    more = open_data(f"hfds:{tmp_path / 'ds'}", PRE, 10)
    assert more.notes == ["4 classes but the model has 10 classes; labels follow sorted order (give --class-map "
                          "to change this)"]


@pytest.mark.parametrize("case", ["no-split", "unlabelled", "missing-label", "save_to_disk", "no-folder", "corrupt"])
def test_hfds_bad_input_is_one_line(tmp_path, hf_datasets, case):
    pixels, labels = hf_rows(4)
    ds = tmp_path / "ds"
    if case == "unlabelled":
        labels = np.full(4, -1)  # as the test split of ILSVRC/imagenet-1k
        write_hf_parquet(hf_datasets, ds / "validation.parquet", pixels, labels, class_names=None)
    elif case == "missing-label":
        features = hf_datasets.Features({"image": hf_datasets.Image(), "label": hf_datasets.Value("int64")})
        good = write_hf_parquet(hf_datasets, tmp_path / "x.parquet", pixels[:2], labels[:2], class_names=None)
        rows = hf_datasets.Dataset.from_parquet(str(good))["image"]
        ds.mkdir()
        hf_datasets.Dataset.from_dict({"image": list(rows), "label": [1, None]}, features=features).to_parquet(
            str(ds / "validation.parquet"))
    elif case == "save_to_disk":
        write_hf_parquet(hf_datasets, tmp_path / "x" / "validation.parquet", pixels, labels)
        hf_datasets.load_dataset(str(tmp_path / "x"), split="validation").save_to_disk(str(ds))
    elif case == "corrupt":
        features = hf_datasets.Features({"image": hf_datasets.Image(), "label": hf_datasets.Value("int64")})
        good = write_hf_parquet(hf_datasets, tmp_path / "x.parquet", pixels[:1], labels[:1], class_names=None)
        row = hf_datasets.Dataset.from_parquet(str(good))[0]["image"]
        rows = {"image": [{"bytes": b"not an image", "path": "broken.png"}, row], "label": [0, 1]}
        ds.mkdir()
        hf_datasets.Dataset.from_dict(rows, features=features).to_parquet(str(ds / "validation.parquet"))
    elif case == "no-split":
        write_hf_parquet(hf_datasets, ds / "train.parquet", pixels, labels)
    spec = f"hfds:{ds}"
    result = invoke("eval", MODEL, "--data", spec, "--device", "cpu", "--workers", "0", code=1)
    line = result.stderr.strip().splitlines()[-1]
    assert result.stdout == "" and line.startswith("error: ") and "Traceback" not in result.stderr
    assert {"no-split": "Should be one of ['train'].); validation is the default split", "unlabelled": "not labelled", "missing-label": "1 row(s) have no label", "save_to_disk": "save_to_disk",
            "no-folder": "folder not found", "corrupt": f"cannot read image row 0 of {spec} (broken.png): not an image"}[case] in line


def prepare_hub_cache(datasets, hub: Path, repo: str, pixels: np.ndarray, labels: np.ndarray) -> None:
    """The Hugging Face hub cache as huggingface_hub writes it: blobs, a snapshot of links, refs/main."""
    folder = hub / f"datasets--{repo.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    blob = write_hf_parquet(datasets, folder / "blobs" / "f00d", pixels, labels)
    link = folder / "snapshots" / revision / "data" / "validation-00000-of-00001.parquet"
    link.parent.mkdir(parents=True)
    link.symlink_to(Path("../../../blobs") / blob.name)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)


def test_hfds_offline_reads_a_prepared_hub_cache_and_says_one_line_without_it(tmp_path, hf_datasets, monkeypatch):
    pixels, labels = hf_rows(6)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    prepare_hub_cache(hf_datasets, tmp_path / "hub", "me/tiny", pixels, labels)
    np.savez(tmp_path / "same.npz", images=pixels, labels=labels)
    reference = eval_json("--data", tmp_path / "same.npz")
    cached = eval_json("--data", "hfds:me/tiny", "--offline")
    assert [cached[k] for k in ("n", "loss", "acc")] == [reference[k] for k in ("n", "loss", "acc")]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the user's own switch: the same, without --offline
    assert eval_json("--data", "hfds:me/tiny:validation")["loss"] == reference["loss"]
    result = invoke("eval", MODEL, "--data", "hfds:me/absent", "--device", "cpu", code=1)
    assert result.stderr.strip() == (f"error: offline: the Hugging Face dataset me/absent is not in the local cache "
                                      f"({tmp_path / 'hub'}); run once without --offline (and without "
                                      "HF_HUB_OFFLINE=1) to download it, or give hfds:FOLDER holding its files")


def test_an_unreadable_image_in_a_tar_is_an_error_not_the_next_sample(tmp_path):
    """timm's ImageDataset replaces an image it cannot read by the next one (with that one's label):
    resprobe decodes the reader's files itself and names the bad one."""
    folder = make_class_folder(tmp_path / "images")
    (folder / "class2" / "img2.jpg").write_bytes(b"not a jpeg")
    with tarfile.open(tmp_path / "images.tar", "w") as tar:
        tar.add(folder, arcname="images")
    result = invoke("eval", MODEL, "--data", tmp_path / "images.tar", "--device", "cpu", "--workers", "0", code=1)
    assert result.stderr.strip() == ("error: cannot read image images/class2/img2.jpg: not an image, or a corrupt one; "
                                     "remove or replace the file")


def test_a_tar_reports_its_image_size(tmp_path):
    """The first image's size drives the upscale warning and the preprocessing line, as for a folder."""
    folder = make_class_folder(tmp_path / "images")
    with tarfile.open(tmp_path / "images.tar", "w") as tar:
        tar.add(folder, arcname="images")
    assert open_data(str(tmp_path / "images.tar"), PRE, 10).image_size == open_data(str(folder), PRE, 10).image_size \
        == (32, 32)


# --------------------------------------------------------------------------------------------------
# Class names matched to the names a resprobe checkpoint records (hfds: ClassLabels, --labels files)


def hand_eval(pixels: np.ndarray, labels: list[int]) -> tuple[float, float]:
    """Loss and accuracy of the fixture model on uint8 NHWC pixels, normalized by hand (its recorded
    mean 0.5, std 0.25, 32×32: no resize), with the labels given."""
    from resprobe.models.loading import LoadOptions, load_model

    model = load_model(MODEL, LoadOptions()).model.eval()
    x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        logits = model(x).double()
    target = torch.tensor(labels)
    return float(torch.nn.functional.cross_entropy(logits, target)), float((logits.argmax(1) == target).double().mean())


def test_hfds_class_labels_follow_the_checkpoints_class_names(tmp_path, hf_datasets):
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    row_names = ["mango", "zebra", "zebra", "mango", "zebra", "mango", "mango", "zebra"]
    hf_order = ["zebra", "mango"]  # the dataset's ClassLabel order: neither the checkpoint's nor the folders'
    write_hf_parquet(hf_datasets, tmp_path / "ds" / "validation.parquet", pixels,
                     np.array([hf_order.index(n) for n in row_names]), class_names=hf_order)
    for i, (image, name) in enumerate(zip(pixels, row_names)):  # the same images as class folders
        save_png(tmp_path / "folders" / name / f"{i}.png", image)
    model = named_checkpoint(tmp_path)
    loss, acc = hand_eval(pixels, [NAMES.index(n) for n in row_names])  # mango 2, zebra 0
    for data in (f"hfds:{tmp_path / 'ds'}", tmp_path / "folders"):
        result = json.loads(invoke("eval", model, "--data", data, "--device", "cpu", "--workers", "0", "-b", "4",
                                   "-f", "json").stdout)
        assert result["loss"] == pytest.approx(loss, rel=1e-5) and result["acc"] == pytest.approx(acc), data
    write_hf_parquet(hf_datasets, tmp_path / "bad" / "validation.parquet", pixels[:2], np.array([0, 1]),
                     class_names=["mango", "pear"])
    bad = invoke("eval", model, "--data", f"hfds:{tmp_path / 'bad'}", "--device", "cpu", code=1)
    assert bad.stderr.strip() == (f"error: hfds:{tmp_path / 'bad'}: the class pear is not among the model's 4 classes "
                                  "(zebra, apple, mango, kiwi); give --class-map to map them")


def save_png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def flat_folder(root: Path, n: int, seed: int = 7) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    for i, image in enumerate(pixels):
        save_png(root / f"img{i}.png", image)
    return pixels


def test_labels_file_with_class_names_follows_the_checkpoint_and_class_map(tmp_path):
    pixels = flat_folder(tmp_path / "flat", 6)
    names = ["kiwi", "zebra", "apple", "kiwi", "mango", "zebra"]
    (tmp_path / "names.csv").write_text("file,label\n" + "".join(f"img{i},{n}\n" for i, n in enumerate(names)))
    common = ["--data", tmp_path / "flat", "--labels", tmp_path / "names.csv", "--device", "cpu", "--workers", "0",
              "-f", "json"]
    # the checkpoint's names: kiwi 3, zebra 0, apple 1, mango 2
    loss, acc = hand_eval(pixels, [NAMES.index(n) for n in names])
    by_names = json.loads(invoke("eval", named_checkpoint(tmp_path), *common).stdout)
    assert by_names["loss"] == pytest.approx(loss, rel=1e-5) and by_names["acc"] == pytest.approx(acc)
    # --class-map decides, with or without the checkpoint's names
    order = ["apple", "kiwi", "mango", "zebra"]
    (tmp_path / "map.txt").write_text("\n".join(order) + "\n")
    loss, acc = hand_eval(pixels, [order.index(n) for n in names])
    for model in (MODEL, named_checkpoint(tmp_path)):
        mapped = json.loads(invoke("eval", model, *common, "--class-map", tmp_path / "map.txt").stdout)
        assert mapped["loss"] == pytest.approx(loss, rel=1e-5) and mapped["acc"] == pytest.approx(acc), model
    # names and no way to map them: one line
    plain = invoke("eval", MODEL, *common, code=1)
    assert plain.stderr.strip() == (f"error: --labels {tmp_path / 'names.csv'} line 2: class 'kiwi' is neither a wnid "
                                    "(n01440764) nor an integer; give --class-map to map class names to the model's "
                                    "classes")
    (tmp_path / "map.txt").write_text("apple\nkiwi\nzebra\n")
    partial = invoke("eval", MODEL, *common, "--class-map", tmp_path / "map.txt", code=1)
    assert partial.stderr.strip() == f"error: --class-map has no entry for classes mango of {tmp_path / 'names.csv'}"
    (tmp_path / "pear.csv").write_text("".join(f"img{i},{'pear' if i == 3 else 'kiwi'}\n" for i in range(6)))
    unknown = invoke("eval", named_checkpoint(tmp_path), "--data", tmp_path / "flat", "--labels", tmp_path / "pear.csv",
                     "--device", "cpu", code=1)
    assert unknown.stderr.strip() == (f"error: {tmp_path / 'pear.csv'}: the class pear is not among the model's 4 "
                                      "classes (zebra, apple, mango, kiwi); give --class-map to map them")


def test_labels_file_wnids_follow_a_class_map(tmp_path):
    wnids = imagenet_wnids()
    flat_folder(tmp_path / "flat", 3)
    (tmp_path / "l.csv").write_text(f"img0,{wnids[9]}\nimg1,{wnids[3]}\nimg2,4\n")
    (tmp_path / "map.txt").write_text(f"{wnids[3]}\n{wnids[9]}\n")
    plain = open_data(str(tmp_path / "flat"), PRE, 1000, labels=str(tmp_path / "l.csv"))
    assert [label for _, label in plain.samples] == [9, 3, 4]  # the 1000-class ImageNet order
    mapped = open_data(str(tmp_path / "flat"), PRE, 4, labels=str(tmp_path / "l.csv"),
                       class_map=str(tmp_path / "map.txt"))
    assert [label for _, label in mapped.samples] == [1, 0, 4]  # integers are class indices already


def test_labels_file_errors_name_the_files_own_line(tmp_path):
    flat_folder(tmp_path / "flat", 3)
    (tmp_path / "l.csv").write_text("file,label\nimg0,1\n\nimg1\nimg2,2\n")  # line 4 has no class
    result = invoke("eval", MODEL, "--data", tmp_path / "flat", "--labels", tmp_path / "l.csv", "--device", "cpu",
                    code=1)
    assert result.stderr.strip() == f"error: --labels {tmp_path / 'l.csv'} line 4: expected FILE,CLASS"
    (tmp_path / "neg.csv").write_text("file,label\nimg0,1\nimg1,2\nimg2,-3\n")
    result = invoke("eval", MODEL, "--data", tmp_path / "flat", "--labels", tmp_path / "neg.csv", "--device", "cpu",
                    code=1)
    assert result.stderr.strip() == f"error: --labels {tmp_path / 'neg.csv'} line 4: negative class -3"
