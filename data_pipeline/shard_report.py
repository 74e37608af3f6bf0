"""`mmdit-shards inspect`'s report: shards read with the training loader's reader and rules,
counted by caption, image size, aspect ratio, format and bad-sample reason."""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections import Counter

from tqdm import tqdm

from data_pipeline.bad_samples import BadSample, BadSampleCounter
from data_pipeline.images import decode_image
from data_pipeline.tar_samples import iter_samples, parse_sample

# Aspect ratio (width / height) histogram bins: [lo, hi).
ASPECT_BINS: tuple[tuple[str, float, float], ...] = (
    ("<0.50", 0.0, 0.5),
    ("0.50-0.75", 0.5, 0.75),
    ("0.75-0.91", 0.75, 0.91),
    ("0.91-1.10", 0.91, 1.10),
    ("1.10-1.33", 1.10, 1.34),  # 4:3 (1.333...) falls in this bin
    ("1.33-2.00", 1.34, 2.0),
    (">=2.00", 2.0, math.inf),
)


def _stats(values: list[int]) -> dict:
    if not values:
        return {"min": None, "median": None, "max": None}
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _aspect_bin(ratio: float) -> str:
    for label, lo, hi in ASPECT_BINS:
        if lo <= ratio < hi:
            return label
    return ASPECT_BINS[-1][0]


def inspect_shards(
    urls: list[str],
    *,
    max_samples: int | None = None,
    caption: str = "txt",
    empty_caption: str = "skip",
    progress: bool = True,
) -> dict:
    """Read shards with the training loader's reader and rules; returns the report dict.

    `bad` holds one count per skipped sample (and per bad shard) by reason, exactly what the
    loader would count; `good` = samples the loader would train on."""
    t0 = time.perf_counter()
    tally = _Tally(caption, empty_caption)
    bar = tqdm(urls, desc="inspect", unit="shard", disable=not progress, file=sys.stderr)
    for url in bar:
        if max_samples is not None and tally.samples >= max_samples:
            break
        for sample in iter_samples(url, tally.counter, on_bad=tally.on_bad):
            tally.add(url, sample)
            bar.set_postfix(samples=tally.samples, bad=tally.counter.total_bad, refresh=False)
            if max_samples is not None and tally.samples >= max_samples:
                break
    bar.close()
    return {
        "shards": len(urls),
        **tally.report(),
        "seconds": round(time.perf_counter() - t0, 3),
    }


class _Tally:
    """The report's counts, one sample at a time; the loader's counter holds good and bad."""

    MAX_EXAMPLES = 20

    def __init__(self, caption: str, empty_caption: str):
        self.caption, self.empty_caption = caption, empty_caption
        self.counter = BadSampleCounter()
        self.samples = self.decodable = 0
        self.captions = Counter({"present": 0, "empty": 0, "missing": 0})
        self.formats: Counter[str] = Counter()
        self.widths: list[int] = []
        self.heights: list[int] = []
        self.aspect = Counter({label: 0 for label, _, _ in ASPECT_BINS})
        self.problem_shards: list[dict] = []
        self.examples: list[dict] = []

    def on_bad(self, reason: str, url: str, key: str, detail: str) -> None:
        """iter_samples' report of a bad shard or of a sample it skipped."""
        if reason in ("truncated_tar", "unreadable_shard"):
            self.problem_shards.append({"url": url, "reason": reason, "detail": detail})
        else:
            self._example(url, key, reason, detail)

    def _example(self, url: str, key: str, reason: str, detail: str) -> None:
        if len(self.examples) < self.MAX_EXAMPLES:
            self.examples.append({"url": url, "key": key, "reason": reason, "detail": detail})

    def add(self, url: str, sample: dict) -> None:
        self.samples += 1
        try:
            parsed = parse_sample(sample, caption=self.caption, empty_caption="keep")
            self.captions["empty" if not parsed["caption"] else "present"] += 1
            img = decode_image(parsed["image_bytes"], key=parsed["key"])
            self.decodable += 1
            w, h = img.size
            self.widths.append(w)
            self.heights.append(h)
            self.aspect[_aspect_bin(w / h)] += 1
            self.formats[parsed["image_ext"]] += 1
            if not parsed["caption"] and self.empty_caption == "skip":
                raise BadSample("empty_caption", parsed["key"])
            self.counter.add_good()
        except BadSample as e:
            if e.reason == "missing_caption":
                self.captions["missing"] += 1
            self.counter.add_bad(e.reason)
            self._example(url, sample["__key__"], e.reason, e.detail)

    def report(self) -> dict:
        return {
            "samples": self.samples,
            "good": self.counter.good,
            "decodable_images": self.decodable,
            "captions": dict(self.captions),
            "formats": dict(self.formats),
            "width": _stats(self.widths),
            "height": _stats(self.heights),
            "aspect_ratio_histogram": dict(self.aspect),
            "bad": self.counter.as_dict(),
            "bad_total": self.counter.total_bad,
            "problem_shards": self.problem_shards,
            "bad_examples": self.examples,
        }
