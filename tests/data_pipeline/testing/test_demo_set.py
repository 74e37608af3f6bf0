"""mmdit-demo-data: the demo's image-caption set from images bundled with installed packages."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline import shards
from data_pipeline.testing import demo_set as dd

N_DIGITS = 1797
N_PHOTO_IMAGES = len(dd.PHOTOS) * dd.VIEWS_PER_PHOTO
SAFE_NAME = re.compile(r"^(digit_\d{5}|photo_[a-z0-9_]+_[0-7])$")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "data"
    assert dd.main(["--out", str(out), "--quiet"]) == 0
    return out


def _names(folder: Path) -> set[str]:
    return {p.stem for p in folder.glob("*.png")}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.*"))}


def test_layout_and_counts(built):
    summary = json.loads((built / "summary.json").read_text())
    assert summary["skipped_photos"] == []  # every listed photo ships with the packages
    counts = summary["counts"]
    assert counts["train"]["sklearn_digits"] + counts["val"]["sklearn_digits"] == N_DIGITS
    photos = sum(counts[s][src] for s in counts for src in ("skimage", "matplotlib"))
    assert photos == N_PHOTO_IMAGES
    for source in dd.SOURCES:  # round(0.1 * n) of each source in val
        total = counts["train"][source] + counts["val"][source]
        assert counts["val"][source] == round(0.1 * total), source
    for split in ("train", "val"):
        folder = built / split
        assert len(_names(folder)) == summary["totals"][split] == sum(counts[split].values())
        assert {p.stem for p in folder.glob("*.txt")} == _names(folder)  # a caption each
        assert {p.suffix for p in folder.iterdir()} == {".png", ".txt"}
    readme = (built / "README.txt").read_text()
    assert "mmdit-shards write --images-dir train" in readme and "CC BY 4.0" in readme
    assert all(p.caption in readme for p in dd.PHOTOS)


def test_splits_are_disjoint_and_names_safe(built):
    train, val = _names(built / "train"), _names(built / "val")
    assert not train & val
    assert len(train | val) == N_DIGITS + N_PHOTO_IMAGES
    assert all(SAFE_NAME.match(n) for n in train | val), sorted(n for n in train | val)[:5]


def test_digit_captions_name_the_right_digit(built):
    from sklearn.datasets import load_digits

    labels = load_digits().target
    main_form = 0
    for split in ("train", "val"):
        for png, caption in dd.iter_captions(built / split):
            if not png.stem.startswith("digit_"):
                continue
            label = int(labels[int(png.stem.split("_")[1])])
            word = dd.DIGIT_WORDS[label]
            named = set(caption.split()) & {*dd.DIGIT_WORDS, *map(str, range(10))}
            assert named in ({word}, {str(label)}), (png.name, caption)
            main_form += caption == f"a handwritten digit {word}"
    assert main_form == N_DIGITS - N_DIGITS // 5  # one in five uses a variant phrasing


def test_photo_views_share_their_photos_caption(built):
    captions = {p.name: p.caption for p in dd.PHOTOS}
    seen = set()
    for split in ("train", "val"):
        for png, caption in dd.iter_captions(built / split):
            if png.stem.startswith("photo_"):
                name = png.stem[len("photo_") : -2]
                assert caption == captions[name], png.name
                seen.add(name)
    assert seen == set(captions)


def test_images_decode_at_the_requested_size(built):
    pngs = sorted((built / "train").glob("*.png"))[::7] + sorted((built / "val").glob("*.png"))
    for png in pngs:
        with Image.open(png) as img:
            assert img.format == "PNG" and img.mode == "RGB" and img.size == (32, 32), png.name


def test_digits_follow_the_training_tests_convention(built):
    """Dark ink on white, exactly what tests/training's digit_members draws."""
    from sklearn.datasets import load_digits

    from tests.training.conftest import digit_members

    digits = load_digits()
    png = next(iter(sorted((built / "train").glob("digit_*.png"))))
    index = int(png.stem.split("_")[1])
    reference = dict(digit_members(index, digits.images[index], int(digits.target[index])))
    expected = np.asarray(Image.open(io.BytesIO(reference[f"digit{index:05d}.png"])))
    assert np.array_equal(np.asarray(Image.open(png)), expected)
    assert expected[0, 0].tolist() == [255, 255, 255]  # white paper in the corner


def test_same_settings_give_identical_files_and_another_seed_another_split(built, tmp_path):
    again = tmp_path / "again"
    dd.make_demo_data(again, progress=False)
    assert _files(again) == _files(built)

    other = tmp_path / "other"
    dd.make_demo_data(other, seed=1, size=16, val_fraction=0.25, progress=False)
    assert _names(other / "val") != _names(built / "val")
    summary = json.loads((other / "summary.json").read_text())
    per_source = [N_DIGITS] + [
        dd.VIEWS_PER_PHOTO * sum(p.source == src for p in dd.PHOTOS)
        for src in ("skimage", "matplotlib")
    ]
    assert summary["totals"]["val"] == sum(round(0.25 * n) for n in per_source)
    with Image.open(next((other / "train").glob("photo_*.png"))) as img:
        assert img.size == (16, 16)


def test_mmdit_shards_accepts_the_train_folder(built, tmp_path, capsys):
    out = tmp_path / "shards"
    assert shards.main(["write", "--images-dir", str(built / "train"), "--out", str(out)]) == 0
    summary = json.loads((out / shards.SUMMARY_NAME).read_text())
    n_train = len(_names(built / "train"))
    assert summary["inputs"] == summary["written"] == n_train
    assert summary["rejected"] == {}
    assert "rejected: none" in capsys.readouterr().out


def test_existing_output_is_refused_unless_overwrite(built, tmp_path, capsys):
    out = tmp_path / "data"
    out.mkdir()
    (out / "old.txt").write_text("previous")
    with pytest.raises(SystemExit) as exc:
        dd.main(["--out", str(out), "--size", "16", "--quiet"])
    assert exc.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["old.txt"]

    assert dd.main(["--out", str(out), "--size", "16", "--quiet", "--overwrite"]) == 0
    assert not (out / "old.txt").exists() and (out / "summary.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temporary dirs left
    printed = capsys.readouterr().out
    assert "train" in printed and "val" in printed and str(out) in printed


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--size", "30"], "multiple of 8"),
        (["--size", "1024"], "multiple of 8"),
        (["--val-fraction", "1"], "val fraction"),
        (["--seed", "-1"], "seed"),
    ],
)
def test_bad_settings_exit_2(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        dd.main(["--out", str(tmp_path / "d"), *extra])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_help_exits_0(capsys):
    with pytest.raises(SystemExit) as exc:
        dd.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--out", "--size", "--val-fraction", "--seed", "--overwrite"):
        assert flag in text


def test_a_failed_swap_keeps_the_old_set(tmp_path, monkeypatch):
    out = tmp_path / "data"
    out.mkdir()
    (out / "old.txt").write_text("previous")
    real_replace = dd.os.replace

    def replace(src, dst):
        if Path(dst) == out and ".tmp-" in Path(src).name:
            raise OSError("simulated rename failure")
        real_replace(src, dst)

    monkeypatch.setattr(dd.os, "replace", replace)
    with pytest.raises(OSError, match="simulated"):
        dd.make_demo_data(out, size=8, overwrite=True, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["data"]
    assert [p.name for p in out.iterdir()] == ["old.txt"]
