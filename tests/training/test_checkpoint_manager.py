"""CheckpointManager without DeepSpeed: publication, listing, validation and the choice of the
checkpoint to resume from (one process, plus one real 2-rank gloo job)."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

from mmdit.atomic_file import temp_name
from mmdit.checkpoints import (
    LATEST,
    MANIFEST,
    TMP_PREFIX,
    UNIVERSAL_TAG,
    client_file_name,
    crc32_file,
    ema_shard_name,
    step_dir_name,
    write_manifest,
)
from mmdit.distributed import free_ports
from training.checkpoint import CheckpointManager, file_owner, write_json_atomic
from training.ema import ShardedEMA

REPO = Path(__file__).resolve().parents[2]
FIND = Path(__file__).with_name("find_checkpoint.py")


def rank_files(rank: int, world: int) -> list[str]:
    return [
        f"ds/zero_pp_rank_{rank}_mp_rank_00_model_states.pt",
        f"ds/bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
        ema_shard_name(rank, world),
        client_file_name(rank),
    ]


def make_checkpoint(run: Path, step: int, world: int) -> Path:
    """A published checkpoint as `CheckpointManager.save` leaves it: files and a manifest."""
    directory = run / "checkpoints" / step_dir_name(step)
    names = ["config.yaml"] + [f for r in range(world) for f in rank_files(r, world)]
    files = {}
    for i, rel in enumerate(names):
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"{rel} step {step} ".encode() * (3 + i))
        files[rel] = {"size": path.stat().st_size, "crc32": crc32_file(path)}
    write_manifest(directory, step, world, files)
    return directory


def flip_bytes(path: Path) -> None:
    """Damage a file without changing its size (only a CRC check can see it)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    data[0] ^= 0x01
    size = path.stat().st_size
    path.write_bytes(bytes(data))
    assert path.stat().st_size == size


def manager(run: Path, rank: int = 0, world: int = 1, keep: int = 3) -> CheckpointManager:
    return CheckpointManager(run, keep=keep, rank=rank, world_size=world)


# -- names -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("relpath", "owner"),
    [
        ("ds/zero_pp_rank_1_mp_rank_00_model_states.pt", 1),
        ("ds/zero_pp_rank_12_mp_rank_00_model_states.pt", 12),
        ("ds/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", 0),
        ("ds/bf16_zero_pp_rank_3_mp_rank_00_optim_states.pt", 3),
        ("client_rank_00001.json", 1),
        ("ema_rank_00001_of_00002.safetensors", 1),
        ("ema_rank_00000_of_00004.safetensors", 0),
        ("config.yaml", None),
        ("manifest.json", None),
    ],
)
def test_file_owner(relpath, owner):
    assert file_owner(relpath) == owner


def test_crc32_file_matches_zlib(tmp_path):
    import zlib

    data = os.urandom(3000)
    (tmp_path / "f").write_bytes(data)
    assert crc32_file(tmp_path / "f", chunk=7) == zlib.crc32(data)
    assert crc32_file(tmp_path / "f") == zlib.crc32(data)


def test_write_json_atomic_leaves_no_temporary(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"b": 1, "a": [2]})
    write_json_atomic(tmp_path / "a.json", {"c": 3})
    assert json.loads((tmp_path / "a.json").read_text()) == {"c": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


# -- listing ---------------------------------------------------------------------------------


def test_published_newest_first_and_ignores_unpublished(tmp_path):
    for step in (1000, 20, 300):
        make_checkpoint(tmp_path, step, world=1)
    root = tmp_path / "checkpoints"
    (root / step_dir_name(5000)).mkdir()  # being written without a manifest: not published
    tmp_dir = make_checkpoint(tmp_path, 9000, world=1)
    tmp_dir.rename(root / f"{TMP_PREFIX}{step_dir_name(9000)}")
    (root / "step_42").mkdir()  # not our name pattern
    (root / LATEST).write_text(step_dir_name(1000) + "\n")
    broken = root / step_dir_name(7000)
    broken.mkdir()
    (broken / MANIFEST).write_text("{not json")

    found = manager(tmp_path).published()
    assert [c.step for c in found] == [1000, 300, 20]
    assert [c.path.name for c in found] == ["step_00001000", "step_00000300", "step_00000020"]
    assert all(c.world_size == 1 for c in found)


def test_published_on_a_fresh_run(tmp_path):
    assert manager(tmp_path / "nothing_here").published() == []
    assert manager(tmp_path / "nothing_here").find_resumable() is None


def test_client_states_read_back(tmp_path):
    make_checkpoint(tmp_path, 10, world=2)
    ckpt = manager(tmp_path, 0, 2).published()[0]
    for r in range(2):
        write_json_atomic(ckpt.path / client_file_name(r), {"rank": r, "step": 10})
    assert ckpt.client_states() == [{"rank": 0, "step": 10}, {"rank": 1, "step": 10}]


# -- validation ------------------------------------------------------------------------------


def test_intact_checkpoint_has_no_problems(tmp_path):
    make_checkpoint(tmp_path, 10, world=2)
    for rank in range(2):
        m = manager(tmp_path, rank, 2)
        assert m.problems(m.published()[0]) == []


def test_missing_file_is_seen_by_every_rank(tmp_path):
    path = make_checkpoint(tmp_path, 10, world=2)
    (path / "ds/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    for rank in range(2):
        m = manager(tmp_path, rank, 2)
        assert m.problems(m.published()[0]) == [
            "ds/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt is missing"
        ]


def test_size_change_is_seen_by_every_rank(tmp_path):
    path = make_checkpoint(tmp_path, 10, world=2)
    target = path / ema_shard_name(1, 2)
    size = target.stat().st_size
    with open(target, "ab") as f:
        f.write(b"x")
    for rank in range(2):
        m = manager(tmp_path, rank, 2)
        (problem,) = m.problems(m.published()[0])
        assert ema_shard_name(1, 2) in problem
        assert f"{size + 1} bytes, manifest says {size}" in problem


def test_crc_change_is_seen_by_the_rank_that_reads_the_file(tmp_path):
    path = make_checkpoint(tmp_path, 10, world=2)
    flip_bytes(path / "ds/zero_pp_rank_1_mp_rank_00_model_states.pt")
    rank0, rank1 = manager(tmp_path, 0, 2), manager(tmp_path, 1, 2)
    ckpt = rank0.published()[0]
    assert rank0.problems(ckpt) == []
    assert rank1.problems(ckpt) == [
        "ds/zero_pp_rank_1_mp_rank_00_model_states.pt fails its CRC-32 check"
    ]


def test_crc_change_in_a_shared_file_is_seen_by_every_rank(tmp_path):
    path = make_checkpoint(tmp_path, 10, world=2)
    flip_bytes(path / "config.yaml")
    for rank in range(2):
        m = manager(tmp_path, rank, 2)
        assert m.problems(m.published()[0]) == ["config.yaml fails its CRC-32 check"]


def test_other_world_size_rank_0_checks_every_file(tmp_path):
    """Resuming 2-rank shards on 1 or 3 ranks: rank 0 converts (reads) all of them."""
    path = make_checkpoint(tmp_path, 10, world=2)
    flip_bytes(path / client_file_name(1))
    assert manager(tmp_path, 0, 1).problems(manager(tmp_path).published()[0]) == [
        "client_rank_00001.json fails its CRC-32 check"
    ]
    ckpt = manager(tmp_path, 0, 3).published()[0]
    assert manager(tmp_path, 0, 3).problems(ckpt) == [
        "client_rank_00001.json fails its CRC-32 check"
    ]
    assert manager(tmp_path, 1, 3).problems(ckpt) == []
    assert manager(tmp_path, 2, 3).problems(ckpt) == []


# -- choosing a checkpoint -------------------------------------------------------------------


def test_find_resumable_newest_intact(tmp_path):
    for step in (100, 200, 300):
        make_checkpoint(tmp_path, step, world=1)
    found = manager(tmp_path).find_resumable()
    assert (found.step, found.path.name) == (300, "step_00000300")


def test_find_resumable_skips_damaged_newest(tmp_path):
    make_checkpoint(tmp_path, 100, world=1)
    make_checkpoint(tmp_path, 200, world=1)
    newest = make_checkpoint(tmp_path, 300, world=1)
    flip_bytes(newest / ema_shard_name(0, 1))
    assert manager(tmp_path).find_resumable().step == 200
    # and past several damaged ones
    (tmp_path / "checkpoints" / step_dir_name(200) / "config.yaml").unlink()
    assert manager(tmp_path).find_resumable().step == 100


def test_find_resumable_treats_a_malformed_manifest_as_damage(tmp_path):
    make_checkpoint(tmp_path, 100, world=1)
    newest = make_checkpoint(tmp_path, 200, world=1)
    write_json_atomic(newest / MANIFEST, {"format": 1, "step": 200, "world_size": 1})
    assert manager(tmp_path).find_resumable().step == 100


def test_find_resumable_none_when_nothing_is_intact(tmp_path):
    for step in (100, 200):
        path = make_checkpoint(tmp_path, step, world=1)
        flip_bytes(path / "ds/zero_pp_rank_0_mp_rank_00_model_states.pt")
    assert manager(tmp_path).find_resumable() is None


def test_remove_stale_temporaries(tmp_path):
    keep = make_checkpoint(tmp_path, 100, world=1)
    root = tmp_path / "checkpoints"
    stale = root / f"{TMP_PREFIX}{step_dir_name(200)}"
    (stale / "ds").mkdir(parents=True)
    (stale / "ds" / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"half")
    (root / f"{TMP_PREFIX}universal").mkdir()

    manager(tmp_path, rank=1, world=2).remove_stale_temporaries()  # only rank 0 cleans
    assert stale.is_dir()
    manager(tmp_path, rank=0, world=2).remove_stale_temporaries()
    assert sorted(p.name for p in root.iterdir()) == [keep.name]
    assert (keep / MANIFEST).is_file()
    manager(tmp_path / "fresh").remove_stale_temporaries()  # no checkpoints dir: no error


def test_a_failed_universal_conversion_publishes_nothing_and_reclaims_a_stale_temporary(
    tmp_path,
):
    """ds_to_universal (real DeepSpeed) fails on make_checkpoint's stand-in shards: neither
    universal/ nor its temporary is left, and a killed conversion's leftover is gone too."""
    path = make_checkpoint(tmp_path, 100, world=2)
    stale = temp_name(path / UNIVERSAL_TAG)
    (stale / "zero").mkdir(parents=True)
    m = manager(tmp_path, rank=0, world=1)
    (checkpoint,) = m.published()
    with pytest.raises(pickle.UnpicklingError):
        m.ensure_universal(checkpoint)
    assert not (path / UNIVERSAL_TAG).exists() and not stale.exists()


# -- saving (world 1, a stand-in engine) -----------------------------------------------------


class FakeEngine:
    """Writes what DeepSpeed's ZeRO-3 save_checkpoint writes for rank 0 of 1."""

    def __init__(self):
        self.calls = []

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        self.calls.append((tag, save_latest))
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        (d / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"model" * 10)
        (d / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"optim" * 20)


def test_save_publishes_validates_and_prunes(tmp_path):
    m = manager(tmp_path, keep=2)
    engine = FakeEngine()
    ema = ShardedEMA(nn.Linear(2, 3).named_parameters(), decay=0.9)
    stale = tmp_path / "checkpoints" / f"{TMP_PREFIX}{step_dir_name(30)}"
    stale.mkdir(parents=True)
    (stale / "junk").write_bytes(b"old")

    for step in (10, 20, 30):
        final = m.save(engine, step, ema, {"step": step}, "model: {}\n")
        assert final == tmp_path / "checkpoints" / step_dir_name(step)
        assert (tmp_path / "checkpoints" / LATEST).read_text() == final.name + "\n"
    assert engine.calls == [("ds", False)] * 3

    assert [c.step for c in m.published()] == [30, 20]  # keep=2 pruned step 10
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        LATEST,
        step_dir_name(20),
        step_dir_name(30),
    ]
    manifest = json.loads((final / MANIFEST).read_text())
    assert (manifest["step"], manifest["world_size"], manifest["format"]) == (30, 1, 1)
    assert sorted(manifest["files"]) == sorted(
        ["config.yaml", client_file_name(0), ema_shard_name(0, 1)] + rank_files(0, 1)[:2]
    )  # the stale temporary's junk did not leak in
    for rel, entry in manifest["files"].items():
        assert entry == {"size": (final / rel).stat().st_size, "crc32": crc32_file(final / rel)}
    assert json.loads((final / client_file_name(0)).read_text()) == {"step": 30}
    assert m.find_resumable().path == final


# -- two real ranks --------------------------------------------------------------------------


@pytest.mark.distributed
def test_two_ranks_agree_to_skip_a_checkpoint_only_rank_1_sees_damaged(tmp_path):
    run = tmp_path / "run"
    make_checkpoint(run, 100, world=2)
    newest = make_checkpoint(run, 200, world=2)
    flip_bytes(newest / "ds/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt")
    # the premise: rank 0 alone would take the newest, rank 1 alone would not
    assert manager(run, 0, 2).problems(manager(run, 0, 2).published()[0]) == []
    assert manager(run, 1, 2).problems(manager(run, 1, 2).published()[0]) != []

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_ports(1)[0]),
            str(FIND),
            str(run),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Both ranks print at once, so lines may run together: match, do not split.
    chosen = sorted(re.findall(r"rank \d chose step_\d+", result.stdout))
    assert chosen == ["rank 0 chose step_00000100", "rank 1 chose step_00000100"], (
        result.stdout + result.stderr
    )
