"""Bad-sample reasons, counting across workers/ranks, and the maximum-bad-fraction abort."""

from __future__ import annotations

import pytest

from data_pipeline.bad_samples import REASONS, BadSample, BadSampleCounter


def test_bad_sample_carries_a_known_reason():
    err = BadSample("corrupt_image", "000012: cannot identify image")
    assert err.reason == "corrupt_image" and "000012" in str(err)
    with pytest.raises(ValueError, match="unknown bad-sample reason 'oops'"):
        BadSample("oops")


def test_counts_merge_like_an_all_reduce():
    a, b = BadSampleCounter(), BadSampleCounter()
    a.add_good(10)
    a.add_bad("corrupt_image")
    b.add_good(5)
    b.add_bad("corrupt_image", 2)
    b.add_bad("truncated_tar")
    a.merge(b.as_dict())
    counts = a.as_dict()
    assert counts["good"] == 15 and counts["corrupt_image"] == 3 and counts["truncated_tar"] == 1
    assert list(counts) == ["good", *REASONS]  # stable order, zeros included
    assert a.total_bad == 4


def test_fraction_check_waits_for_enough_samples():
    counter = BadSampleCounter(max_bad_fraction=0.05)
    counter.add_bad("corrupt_image", 3)  # 100% bad, but only 3 samples seen
    counter.check(min_samples=100)
    counter.add_bad("corrupt_image", 97)
    with pytest.raises(RuntimeError, match="100 of 100"):
        counter.check(min_samples=100)


def test_fraction_check_aborts_only_above_the_limit():
    counter = BadSampleCounter(max_bad_fraction=0.05)
    counter.add_good(95)
    counter.add_bad("corrupt_image", 5)  # exactly 5%: allowed
    counter.check(min_samples=100)
    counter.add_bad("missing_caption", 2)  # 7 of 102 = 6.9%
    with pytest.raises(RuntimeError) as info:
        counter.check(min_samples=100)
    message = str(info.value)
    assert "7 of 102" in message and "corrupt_image=5" in message
    assert "missing_caption=2" in message and "data.max_bad_fraction" in message
