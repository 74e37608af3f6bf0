"""`mmdit-shards write` / `inspect`: round trips through webdataset itself, exact counts, errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from data_pipeline import shard_writer
from data_pipeline.shards import main
from tests.data_pipeline.conftest import EXPECTED_FAULTY, EXPECTED_FAULTY_SAMPLES


def _wds_read(out: Path) -> list[dict]:
    urls = sorted(str(p) for p in out.glob("*.tar"))
    return list(wds.WebDataset(urls, shardshuffle=False))  # no decoder: raw bytes


def _check_roundtrip(out: Path, photos, expected_rejected: dict, n_shards: int) -> list[dict]:
    summary = json.loads((out / "_write_summary.json").read_text())
    assert summary["written"] == len(photos)
    assert summary["rejected"] == expected_rejected
    assert summary["shards"] == n_shards == len(list(out.glob("*.tar")))
    assert summary["bytes"] == sum(p.stat().st_size for p in out.glob("*.tar"))
    assert not list(out.glob("*.tmp"))
    samples = _wds_read(out)
    by_caption = {p.caption: p for p in photos}
    assert sorted(s["txt"].decode() for s in samples) == sorted(by_caption)
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == len(keys) and all(len(k) == 6 and k.isdigit() for k in keys)
    for s in samples:
        ph = by_caption[s["txt"].decode()]
        meta = json.loads(s["json"])
        assert meta["key"] == s["__key__"] and meta["caption"] == ph.caption
        assert (meta["width"], meta["height"]) == ph.size
        assert (meta["original_width"], meta["original_height"]) == ph.size
        assert meta["status"] == "success" and meta["error_message"] is None
        assert s[ph.ext] == ph.data  # original bytes, extension from the real format
    return samples


@pytest.fixture()
def image_folder(tmp_path, photos):
    d = tmp_path / "images"
    (d / "sub").mkdir(parents=True)
    for i, ph in enumerate(photos):
        folder = d / "sub" if i == 4 else d
        (folder / f"{ph.name}.{ph.ext}").write_bytes(ph.data)
        side = ".caption" if i == 1 else ".txt"
        (folder / f"{ph.name}{side}").write_text(ph.caption + "\n")
    # rejected inputs
    (d / "nocaption.jpg").write_bytes(photos[0].data)
    (d / "emptycaption.png").write_bytes(photos[1].data)
    (d / "emptycaption.txt").write_text("   \n")
    (d / "corrupt.jpg").write_bytes(photos[0].data[: len(photos[0].data) // 2])
    (d / "corrupt.txt").write_text("half a jpeg")
    (d / "notes.md").write_text("not an image")
    return d


def test_write_images_dir_roundtrip_and_rollover(tmp_path, image_folder, photos, capsys):
    out = tmp_path / "out"
    rc = main(["write", "--out", str(out), "--images-dir", str(image_folder), "--max-count", "2"])
    assert rc == 0
    rejected = {"corrupt_image": 1, "missing_caption": 1, "empty_caption": 1}
    _check_roundtrip(out, photos, rejected, n_shards=3)
    names = sorted(p.name for p in out.glob("*.tar"))
    assert names == ["000000.tar", "000001.tar", "000002.tar"]
    keys_per_shard = [[s["__key__"] for s in _wds_read_one(out / n)] for n in names]
    assert keys_per_shard == [["000000", "000001"], ["000010", "000011"], ["000020"]]
    assert "wrote 5 of 8 samples in 3 shards" in capsys.readouterr().out


def _wds_read_one(path: Path) -> list[dict]:
    return list(wds.WebDataset([str(path)], shardshuffle=False))


def _write_table(path: Path, kind: str, rows: list[dict]) -> None:
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
        return
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if kind == "tsv" else ",")
        w.writeheader()
        w.writerows(rows)


@pytest.mark.parametrize("kind", ["csv", "tsv", "parquet"])
def test_write_from_tables(tmp_path, photos, kind):
    src = tmp_path / "src"
    (src / "img").mkdir(parents=True)
    rows = []
    for ph in photos:
        (src / "img" / f"{ph.name}.{ph.ext}").write_bytes(ph.data)
        rows.append({"file": f"img/{ph.name}.{ph.ext}", "text": ph.caption, "extra": "x, y"})
    (src / "img" / "bad.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    rows += [
        {"file": "img/missing.jpg", "text": "file is missing", "extra": ""},
        {"file": "img/bad.jpg", "text": "corrupt", "extra": ""},
        {"file": f"img/{photos[0].name}.{photos[0].ext}", "text": " ", "extra": ""},
    ]
    table = src / f"table.{kind}"
    _write_table(table, kind, rows)
    out = tmp_path / "out"
    args = ["write", "--out", str(out), f"--{kind}", str(table), "--quiet"]
    rc = main([*args, "--image-col", "file", "--caption-col", "text", "--max-count", "4"])
    assert rc == 0
    rejected = {"missing_image": 1, "corrupt_image": 1, "empty_caption": 1}
    samples = _check_roundtrip(out, photos, rejected, n_shards=2)
    meta = json.loads(samples[0]["json"])
    assert meta["source"] == table.name and meta["original_path"].startswith("img/")


def test_write_reencode_jpg_and_prefix(tmp_path, image_folder):
    out = tmp_path / "out"
    args = ["--images-dir", str(image_folder), "--reencode", "jpg", "--prefix", "cc-", "--quiet"]
    assert main(["write", "--out", str(out), *args]) == 0
    assert [p.name for p in out.glob("*.tar")] == ["cc-000000.tar"]
    samples = _wds_read(out)
    assert len(samples) == 5 and all(s["__key__"].startswith("cc-0000") for s in samples)
    for s in samples:
        assert set(s) >= {"jpg", "txt", "json"} and not {"png", "webp"} & set(s)
        meta = json.loads(s["json"])
        img = Image.open(__import__("io").BytesIO(s["jpg"]))
        assert img.format == "JPEG" and img.size == (meta["width"], meta["height"])


def test_write_is_atomic_per_shard(tmp_path, image_folder, monkeypatch):
    real = shard_writer._encode_item
    calls = {"n": 0}

    def crash_on_fourth(item, reencode):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(item, reencode)

    monkeypatch.setattr(shard_writer, "_encode_item", crash_on_fourth)
    out = tmp_path / "out"
    good_only = tmp_path / "good"
    good_only.mkdir()
    for p in image_folder.iterdir():
        if p.is_file() and p.stem not in ("nocaption", "emptycaption", "corrupt"):
            (good_only / p.name).write_bytes(p.read_bytes())
    with pytest.raises(KeyboardInterrupt):
        main(["write", "--out", str(out), "--images-dir", str(good_only), "--max-count", "2"])
    # shard 0 (2 samples) completed; shard 1 had 1 sample when the crash came: no final name
    assert sorted(p.name for p in out.iterdir()) == ["000000.tar"]
    assert len(_wds_read(out)) == 2


def test_inspect_faulty_shards_exact_counts(faulty_shards, tmp_path, capsys):
    report_path = tmp_path / "report.json"
    rc = main(["inspect", str(faulty_shards.dir), "--out", str(report_path), "--quiet"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(report_path.read_text())
    assert printed["bad"] == EXPECTED_FAULTY
    assert printed["samples"] == EXPECTED_FAULTY_SAMPLES and printed["good"] == 5
    assert not faulty_shards.marker.exists()
    # decodable = all images except the corrupt one (missing image/caption, bad json not decoded)
    assert printed["decodable_images"] == 6
    assert printed["captions"] == {"present": 6, "empty": 1, "missing": 1}
    assert sum(printed["aspect_ratio_histogram"].values()) == 6
    assert [p["reason"] for p in printed["problem_shards"]] == ["truncated_tar"]
    assert printed["problem_shards"][0]["url"].endswith("000001.tar")


def test_inspect_img2dataset_directory(img2dataset_dir, photos, capsys):
    assert main(["inspect", str(img2dataset_dir), "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["shards"] == 2 and report["samples"] == report["good"] == len(photos)
    assert report["bad_total"] == 0 and report["formats"] == {"jpg": len(photos)}
    widths = sorted(p.size[0] for p in photos)
    heights = sorted(p.size[1] for p in photos)
    assert report["width"] == {"min": widths[0], "median": widths[2], "max": widths[-1]}
    assert report["height"] == {"min": heights[0], "median": heights[2], "max": heights[-1]}
    hist = report["aspect_ratio_histogram"]
    # 96x64=1.5, 64x128=0.5, 160x90=1.78, 80x80=1.0, 72x120=0.6
    assert hist["1.33-2.00"] == 2 and hist["0.50-0.75"] == 2 and hist["0.91-1.10"] == 1


def test_inspect_list_file_with_missing_shard_and_max_samples(img2dataset_dir, tmp_path, capsys):
    listing = tmp_path / "shards.txt"
    listing.write_text(f"{img2dataset_dir}/00000.tar\n{tmp_path}/gone.tar\n")
    assert main(["inspect", str(listing), "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["good"] == 3 and report["bad"]["unreadable_shard"] == 1
    assert main(["inspect", str(img2dataset_dir), "--max-samples", "4", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 4


def test_written_shards_inspect_clean(tmp_path, image_folder, capsys):
    out = tmp_path / "out"
    assert main(["write", "--out", str(out), "--images-dir", str(image_folder), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out / "{000000..000000}.tar"), "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["good"] == 5 and report["bad_total"] == 0
    assert report["formats"] == {"jpg": 2, "png": 2, "webp": 1}


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["inspect", ""], "empty"),
        (["inspect", "/nonexistent/{0..3}.tar"], "/nonexistent/{0..3}.tar"),
        (["write", "--out", "OUT", "--images-dir", "/nonexistent/dir"], "/nonexistent/dir"),
        (["write", "--out", "OUT", "--csv", "/nonexistent/t.csv"], "/nonexistent/t.csv"),
        (["write", "--out", "OUT", "--csv", "TABLE", "--image-col", "img"], "--image-col"),
        (["write", "--out", "OUT", "--images-dir", "IMAGES", "--prefix", "a.b"], "--prefix"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, image_folder, capsys, argv, needle):
    table = tmp_path / "t.csv"
    table.write_text("path,caption\nx.jpg,hi\n")
    subs = {"OUT": str(tmp_path / "out"), "TABLE": str(table), "IMAGES": str(image_folder)}
    argv = [subs.get(a, a) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and err.startswith("mmdit-shards")
    assert not (tmp_path / "out").exists()


def test_write_refuses_a_directory_with_shards(tmp_path, image_folder, capsys):
    out = tmp_path / "out"
    args = ["write", "--out", str(out), "--images-dir", str(image_folder), "--quiet"]
    assert main(args) == 0
    before = (out / "000000.tar").read_bytes()
    assert main(args) == 2
    assert "already holds shards" in capsys.readouterr().err
    assert (out / "000000.tar").read_bytes() == before


def test_console_script_is_installed(tmp_path, img2dataset_dir):
    exe = Path(sys.executable).parent / "mmdit-shards"
    assert exe.exists(), "run pip install -e . to install the mmdit-shards entry point"
    ok = subprocess.run([str(exe), "inspect", str(img2dataset_dir)], capture_output=True, text=True)
    assert ok.returncode == 0 and json.loads(ok.stdout)["good"] == 5
    bad = subprocess.run([str(exe), "inspect", str(tmp_path / "none")], capture_output=True)
    assert bad.returncode == 2 and bad.stderr.count(b"\n") == 1 and not bad.stdout
