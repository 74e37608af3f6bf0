"""Bad samples: one exception type with a reason, and per-reason counters.

A multi-day run never dies on one bad sample: readers raise `BadSample(reason, detail)` for a
sample they cannot use, the pipeline catches it, counts it under its reason and moves on (no
sleep). The counts are plain ints so the trainer can all-reduce them across ranks and the
limit check can abort with the numbers when bad samples exceed the configured fraction.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

# Every reason a sample or shard can be skipped for; counters and reports use these names.
REASONS: tuple[str, ...] = (
    "corrupt_image",  # image bytes that do not decode (truncated, not an image, bad header)
    "missing_image",  # no jpg/jpeg/png/webp member for the key
    "missing_caption",  # no caption member / json field
    "empty_caption",  # caption present but blank (when empty_caption == "skip")
    "bad_json",  # json member that does not parse or is not an object
    "forbidden_member",  # pickle-bearing member (.pyd/.pkl/.pickle/.pth): never unpickled
    "unsafe_key",  # key with a path component ('..', absolute, backslash): never a file path
    "truncated_tar",  # tar ended mid-member; the complete samples before the cut are kept
    "unreadable_shard",  # shard that cannot be opened or read at all
    "too_small",  # image smaller than the minimum side the buckets allow
)


class BadSample(Exception):
    """A sample (or shard) that must be skipped; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown bad-sample reason {reason!r}; known: {', '.join(REASONS)}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class BadSampleCounter:
    """Counts good samples and bad ones per reason; enforces a maximum bad fraction."""

    def __init__(self, max_bad_fraction: float = 1.0):
        self.max_bad_fraction = max_bad_fraction
        self.good = 0
        self.bad: Counter[str] = Counter()

    def add_good(self, n: int = 1) -> None:
        self.good += n

    def add_bad(self, reason: str, n: int = 1) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown bad-sample reason {reason!r}")
        self.bad[reason] += n

    @property
    def total_bad(self) -> int:
        return sum(self.bad.values())

    def as_dict(self) -> dict[str, int]:
        """Plain counts: 'good' and one entry per reason (zeros included, stable order)."""
        return {"good": self.good, **{reason: self.bad[reason] for reason in REASONS}}

    def merge(self, counts: Mapping[str, int]) -> None:
        """Add counts from another counter's `as_dict()` (another worker or rank)."""
        self.good += counts.get("good", 0)
        for reason in REASONS:
            self.bad[reason] += counts.get(reason, 0)

    def check(self, min_samples: int = 100) -> None:
        """Abort with the counts when bad samples exceed the allowed fraction.

        Checked only after `min_samples` so that one early bad sample cannot end a run."""
        seen = self.good + self.total_bad
        if seen < min_samples or not self.total_bad:
            return
        fraction = self.total_bad / seen
        if fraction > self.max_bad_fraction:
            details = ", ".join(f"{r}={n}" for r, n in self.bad.most_common() if n)
            raise RuntimeError(
                f"{self.total_bad} of {seen} samples were bad ({fraction:.1%} > "
                f"data.max_bad_fraction={self.max_bad_fraction:.1%}): {details}. Inspect the "
                "shards with `mmdit-shards inspect`, fix or drop them, or raise "
                "data.max_bad_fraction"
            )
