"""The checkpoint layout's read side without a trainer: the manifest, and naming a checkpoint as
RUN, RUN:STEP, RUN/STEP or a directory. Checkpoints are published here with the layout's own
writer of the manifest (training/checkpoint.py uses the same one); the weight readers are
tested on real runs (tests/training/test_export.py, test_ema_sharding.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmdit.checkpoints import (
    LATEST,
    MANIFEST,
    CheckpointError,
    available_steps,
    check_sizes,
    checkpoints_dir,
    crc32_file,
    is_training_checkpoint,
    read_manifest,
    resolve_checkpoint,
    run_checkpoints,
    step_dir_name,
    write_manifest,
)


def publish(run: Path, step: int, latest: bool = True) -> Path:
    directory = checkpoints_dir(run) / step_dir_name(step)
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(f"step: {step}\n")
    path = directory / "config.yaml"
    write_manifest(directory, step, 2, {"config.yaml": {"size": 8, "crc32": crc32_file(path)}})
    if latest:
        (checkpoints_dir(run) / LATEST).write_text(directory.name + "\n")
    return directory


@pytest.fixture
def run(tmp_path) -> Path:
    """Steps 2 and 3 published (3 is `latest`), step 4 still being written (no manifest)."""
    run = tmp_path / "run"
    publish(run, 2)
    publish(run, 3)
    (checkpoints_dir(run) / step_dir_name(4) / "ds").mkdir(parents=True)
    return run


def test_manifest_round_trip(run):
    manifest = read_manifest(checkpoints_dir(run) / step_dir_name(3))
    assert manifest["format"] == 1 and manifest["step"] == 3 and manifest["world_size"] == 2
    assert set(manifest["files"]) == {"config.yaml"}
    assert not list(checkpoints_dir(run).rglob(f".{MANIFEST}.*"))  # written atomically


def test_only_published_checkpoints_count(run):
    assert available_steps(checkpoints_dir(run)) == [2, 3]
    assert run_checkpoints(run) == [checkpoints_dir(run) / step_dir_name(s) for s in (2, 3)]
    assert available_steps(run / "nothing") == []


def test_every_form_of_naming_a_checkpoint(run):
    root = checkpoints_dir(run)
    step2, step3 = root / step_dir_name(2), root / step_dir_name(3)
    assert resolve_checkpoint(run) == step3
    assert resolve_checkpoint(root) == step3
    assert resolve_checkpoint(f"{run}:2") == step2
    assert resolve_checkpoint(f"{run}/2") == step2
    assert resolve_checkpoint(f"{run}/step_00000002") == step2
    assert resolve_checkpoint(step2) == step2
    for spec in (run, f"{run}:2", step2):
        assert is_training_checkpoint(spec)


def test_what_cannot_be_resolved_says_what_exists(run, tmp_path):
    with pytest.raises(CheckpointError, match=r"step 7 .*available steps in .*: 2, 3"):
        resolve_checkpoint(f"{run}:7")
    with pytest.raises(CheckpointError, match=r"step 4 .*has no manifest.json \(incomplete\)"):
        resolve_checkpoint(f"{run}:4")
    with pytest.raises(CheckpointError, match="neither a run directory"):
        resolve_checkpoint(tmp_path / "nothing-here")
    assert not is_training_checkpoint(tmp_path / "weights.safetensors")

    fresh = tmp_path / "fresh"
    publish(fresh, 5, latest=False)
    with pytest.raises(CheckpointError, match=r"latest does not exist .*available steps.*: 5"):
        resolve_checkpoint(fresh)


def test_sizes_are_checked_against_the_manifest(run):
    step3 = checkpoints_dir(run) / step_dir_name(3)
    check_sizes(step3, lambda rel: rel == "config.yaml")
    with pytest.raises(CheckpointError, match="lists none of the files"):
        check_sizes(step3, lambda rel: rel.startswith("ds/"))
    (step3 / "config.yaml").write_text("step: 3 and more\n")
    with pytest.raises(CheckpointError, match=r"damaged: config.yaml has 17 bytes, .* says 8"):
        check_sizes(step3, lambda rel: rel == "config.yaml")
