"""The safe shard reader: grouping, planted faults counted exactly, truncation, shard specs."""

from __future__ import annotations

import pickle
import shlex
import threading
import time

import pytest

from data_pipeline.bad_samples import BadSample, BadSampleCounter
from data_pipeline.images import decode_image
from data_pipeline.tar_samples import expand_shards, iter_samples, parse_sample
from tests.data_pipeline.conftest import (
    EXPECTED_FAULTY,
    EXPECTED_FAULTY_SAMPLES,
    good_members,
    make_tar,
    member_offsets,
    pickle_payload,
)


def _read_all(urls, counter, **parse_kw):
    """What the loader does: iterate, parse, decode; count good and bad per reason."""
    samples, good = [], []
    for url in urls:
        for sample in iter_samples(url, counter):
            samples.append(sample)
            try:
                parsed = parse_sample(sample, **parse_kw)
                decode_image(parsed["image_bytes"], key=parsed["key"])
            except BadSample as e:
                counter.add_bad(e.reason)
                continue
            counter.add_good()
            good.append(parsed)
    return samples, good


def test_clean_shard_groups_members_into_samples(tmp_path, photos):
    members = []
    for i, ph in enumerate(photos):
        members += good_members(f"{i:06d}", ph)
    members.append(("000009.JPG", photos[0].data))  # upper-case extension is lower-cased
    members.append(("000009.txt", b"  upper case  "))
    path = tmp_path / "clean.tar"
    path.write_bytes(make_tar(members))
    counter = BadSampleCounter()
    samples = list(iter_samples(str(path), counter))
    assert [s["__key__"] for s in samples] == [f"{i:06d}" for i in range(5)] + ["000009"]
    assert all(s["__url__"] == str(path) for s in samples)
    assert set(samples[1]) == {"__key__", "__url__", photos[1].ext, "txt", "json"}
    assert samples[-1]["jpg"] == photos[0].data
    assert counter.total_bad == 0
    parsed = parse_sample(samples[-1])
    assert parsed["caption"] == "upper case" and parsed["image_ext"] == "jpg"
    assert parsed["meta"] == {}
    p2 = parse_sample(samples[2])
    assert p2["image_bytes"] == photos[2].data and p2["image_ext"] == photos[2].ext
    assert p2["meta"]["width"] == photos[2].size[0] and p2["key"] == "000002"


def test_faulty_shards_exact_counts_and_no_unpickling(faulty_shards):
    # Sanity: the planted payload really creates a file when unpickled.
    probe = faulty_shards.marker.with_name("probe")
    pickle.loads(pickle_payload(probe))
    assert probe.exists()

    counter = BadSampleCounter()
    samples, good = _read_all(faulty_shards.urls, counter)
    assert counter.as_dict() == EXPECTED_FAULTY
    assert len(samples) == EXPECTED_FAULTY_SAMPLES
    assert not faulty_shards.marker.exists()
    keys = [s["__key__"] for s in samples]
    assert all(".." not in k for k in keys)
    pickled = next(s for s in samples if s["__key__"] == "s0_pickle")
    assert set(pickled) == {"__key__", "__url__", "png", "txt"}  # pickle members dropped
    assert sorted(p["key"] for p in good) == sorted(
        ["s0_good1", "s0_good2", "s0_pickle", "s1_good3", "s1_good4"]
    )


def test_empty_caption_kept_when_asked(faulty_shards):
    counter = BadSampleCounter()
    _, good = _read_all(faulty_shards.urls, counter, empty_caption="keep")
    assert counter.bad["empty_caption"] == 0 and counter.good == EXPECTED_FAULTY["good"] + 1
    assert next(p for p in good if p["key"] == "s0_emptycap")["caption"] == ""


def test_truncated_shard_yields_complete_samples_before_the_cut(faulty_shards):
    counter = BadSampleCounter()
    samples = list(iter_samples(faulty_shards.urls[1], counter))
    assert [s["__key__"] for s in samples] == faulty_shards.truncated_good_keys
    assert all({"txt", "json"} <= set(s) for s in samples)
    assert counter.bad["truncated_tar"] == 1 and counter.total_bad == 1


@pytest.mark.parametrize("where", ["mid_header", "at_member_boundary", "mid_first_member"])
def test_other_truncations_are_counted(tmp_path, photos, where):
    members = [*good_members("a", photos[0]), *good_members("b", photos[1])]
    members += good_members("c", photos[2])
    full = make_tar(members)
    offsets = member_offsets(full)
    header_c, _, _ = offsets[f"c.{photos[2].ext}"]
    if where == "mid_header":
        cut, expected = header_c + 100, ["a"]  # b was being assembled: dropped
    elif where == "at_member_boundary":
        cut, expected = header_c, ["a"]  # no end-of-archive block: b may be incomplete
    else:
        _, data_a, size_a = offsets[f"a.{photos[0].ext}"]
        cut, expected = data_a + size_a // 2, []
    path = tmp_path / "cut.tar"
    path.write_bytes(full[:cut])
    counter = BadSampleCounter()
    assert [s["__key__"] for s in iter_samples(str(path), counter)] == expected
    assert counter.as_dict()["truncated_tar"] == 1 and counter.total_bad == 1


def test_complete_tar_is_not_truncated(tmp_path, photos):
    path = tmp_path / "ok.tar"
    path.write_bytes(make_tar(good_members("a", photos[0])))
    counter = BadSampleCounter()
    assert len(list(iter_samples(str(path), counter))) == 1 and counter.total_bad == 0


def test_unreadable_shards_are_counted_not_raised(tmp_path, photos):
    (tmp_path / "garbage.tar").write_bytes(b"this is not a tar file at all" * 40)
    (tmp_path / "empty.tar").write_bytes(b"")
    urls = [
        str(tmp_path / "missing.tar"),
        str(tmp_path / "garbage.tar"),
        str(tmp_path / "empty.tar"),
        "pipe:exit 3",
        "nosuchscheme://x/y.tar",
    ]
    counter = BadSampleCounter()
    seen = []
    for url in urls:
        assert list(iter_samples(url, counter, on_bad=lambda *a: seen.append(a))) == []
    assert counter.as_dict()["unreadable_shard"] == len(urls) and counter.total_bad == len(urls)
    assert [a[1] for a in seen] == urls and {a[0] for a in seen} == {"unreadable_shard"}


def test_pipe_urls_are_opened_with_webdataset_gopen(tmp_path, photos):
    path = tmp_path / "piped.tar"
    path.write_bytes(make_tar(good_members("k1", photos[0]) + good_members("k2", photos[1])))
    counter = BadSampleCounter()
    url = f"pipe:cat {shlex.quote(str(path))}"
    samples = list(iter_samples(url, counter))
    assert [s["__key__"] for s in samples] == ["k1", "k2"] and counter.total_bad == 0
    assert samples[0]["__url__"] == url


@pytest.mark.parametrize(
    "name",
    ["../x", "/abs/x", "a\\b", "a//b", "./x", "a/../b"],
)
def test_unsafe_keys_skip_the_whole_sample(tmp_path, photos, name):
    members = [(f"{name}.jpg", photos[0].data), (f"{name}.txt", b"cap")]
    members += good_members("sub/ok", photos[1])  # sub-directories are fine
    path = tmp_path / "keys.tar"
    path.write_bytes(make_tar(members))
    counter = BadSampleCounter()
    samples = list(iter_samples(str(path), counter))
    assert [s["__key__"] for s in samples] == ["sub/ok"]
    assert counter.as_dict()["unsafe_key"] == 1 and counter.total_bad == 1


def test_parse_sample_rules(photos):
    base = {"__key__": "k", "__url__": "u", "jpg": b"img"}
    with pytest.raises(BadSample) as e:
        parse_sample({"__key__": "k", "txt": b"cap"})
    assert e.value.reason == "missing_image"
    with pytest.raises(BadSample) as e:
        parse_sample({**base, "txt": b"cap", "json": b"[1, 2]"})
    assert e.value.reason == "bad_json"
    with pytest.raises(BadSample) as e:
        parse_sample({**base, "txt": b"\xff\xfe"})
    assert e.value.reason == "missing_caption"
    got = parse_sample({**base, "json": b'{"caption": " from json "}'}, caption="json:caption")
    assert got["caption"] == "from json" and got["meta"] == {"caption": " from json "}
    with pytest.raises(BadSample) as e:
        parse_sample({**base, "json": b'{"other": 1}'}, caption="json:caption")
    assert e.value.reason == "missing_caption"
    with pytest.raises(BadSample) as e:
        parse_sample({**base, "json": b'{"caption": ""}'}, caption="json:caption")
    assert e.value.reason == "empty_caption"
    # jpeg is preferred after jpg, before png
    got = parse_sample({"__key__": "k", "png": b"p", "jpeg": b"j", "txt": b"c"})
    assert got["image_ext"] == "jpeg" and got["image_bytes"] == b"j"
    with pytest.raises(ValueError, match="caption="):
        parse_sample({**base, "txt": b"c"}, caption="text")


def test_expand_shards(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    for i in (2, 0, 1):
        (d / f"{i:06d}.tar").write_bytes(b"")
    (d / "000000.parquet").write_bytes(b"")
    (d / "000000_stats.json").write_text("{}")
    tars = [str(d / f"{i:06d}.tar") for i in range(3)]
    assert expand_shards(str(d)) == tars
    assert expand_shards(str(d / "{000000..000002}.tar")) == tars
    assert expand_shards(str(d / "{000000,000002}.tar")) == [tars[0], tars[2]]
    assert expand_shards(f"{tars[1]},{tars[0]}") == [tars[1], tars[0]]
    listing = tmp_path / "list.shards"
    listing.write_text(f"# comment\nd/000001.tar\n\n{tars[2]}\n")
    assert expand_shards(str(listing)) == [tars[1], tars[2]]
    (tmp_path / "list.txt").write_text("d/{000000..000001}.tar\n")
    assert expand_shards(str(tmp_path / "list.txt")) == tars[:2]
    assert expand_shards("pipe:curl -s https://x/{0..1}.tar") == [
        "pipe:curl -s https://x/0.tar",
        "pipe:curl -s https://x/1.tar",
    ]
    assert expand_shards("s3://bucket/a.tar") == ["s3://bucket/a.tar"]
    for bad in (str(tmp_path / "nope.tar"), str(tmp_path / "nope{0..3}.tar")):
        with pytest.raises(ValueError, match="nope"):
            expand_shards(bad)
    with pytest.raises(ValueError, match="empty"):
        expand_shards("  ")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ValueError, match="emptydir"):
        expand_shards(str(tmp_path / "emptydir"))


# --- retrying a shard that cannot be opened ---------------------------------------------------


def test_an_unopenable_shard_is_retried_then_counted_once(tmp_path, caplog):
    url = str(tmp_path / "vanished.tar")
    counter = BadSampleCounter()
    seen = []
    t0 = time.monotonic()
    samples = list(
        iter_samples(
            url, counter, on_bad=lambda *a: seen.append(a), open_retries=2, retry_wait_s=0.2
        )
    )
    waited = time.monotonic() - t0
    assert samples == [] and counter.as_dict()["unreadable_shard"] == counter.total_bad == 1
    # Two waits between three tries; nothing else sleeps.
    assert 0.4 <= waited < 2.0, waited
    tries = [r.getMessage() for r in caplog.records if "cannot open shard" in r.getMessage()]
    assert len(tries) == 2 and "try 2 of 3" in tries[0] and "try 3 of 3" in tries[1], tries
    (reason, bad_url, _, detail), *more = seen
    assert more == [] and (reason, bad_url) == ("unreadable_shard", url)
    assert "FileNotFoundError" in detail and "after 3 tries, 0.2 s apart" in detail


def test_a_shard_back_within_the_retries_is_read_whole(tmp_path, photos):
    """An NFS hiccup: the shard is missing at the first try and back before the second."""
    path = tmp_path / "000000.tar"
    away = tmp_path / "moved-away"
    path.write_bytes(make_tar(good_members("a", photos[0]) + good_members("b", photos[1])))
    path.rename(away)
    timer = threading.Timer(0.2, away.rename, (path,))
    timer.start()
    try:
        counter = BadSampleCounter()
        samples = list(iter_samples(str(path), counter, open_retries=2, retry_wait_s=1.0))
    finally:
        timer.join()
    assert [s["__key__"] for s in samples] == ["a", "b"] and counter.total_bad == 0


def test_bytes_that_are_not_a_tar_are_not_retried(tmp_path):
    (tmp_path / "garbage.tar").write_bytes(b"this is not a tar file at all" * 40)
    counter = BadSampleCounter()
    t0 = time.monotonic()
    assert list(iter_samples(str(tmp_path / "garbage.tar"), counter, open_retries=3)) == []
    assert time.monotonic() - t0 < 0.5  # no 1 s waits: the bytes will not change
    assert counter.as_dict()["unreadable_shard"] == 1


def test_negative_retry_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="open_retries=-1"):
        list(iter_samples(str(tmp_path / "x.tar"), open_retries=-1))
