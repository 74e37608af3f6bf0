"""Process layout detection for torchrun, srun and plain python, and Slurm node-list parsing."""

from __future__ import annotations

import os
import stat

import pytest

from mmdit.distributed import DEFAULT_PORT, DistEnv, detect, first_host


@pytest.fixture
def no_scontrol(tmp_path, monkeypatch):
    """A PATH on which `scontrol` does not exist, so first_host falls back to its parser."""
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


@pytest.fixture
def fake_scontrol(tmp_path, monkeypatch):
    """A `scontrol` that answers `show hostnames` with names the parser could never produce."""
    bin_dir = tmp_path / "fake_bin"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(
        '#!/bin/sh\n[ "$1 $2" = "show hostnames" ] || exit 2\necho "from-scontrol-a"\n'
        'echo "from-scontrol-b"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")


# -- detect ----------------------------------------------------------------------------------


def test_detect_torchrun():
    env = {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "node17",
        "MASTER_PORT": "29611",
    }
    d = detect(env)
    assert d == DistEnv(5, 8, 1, "node17", 29611, "torchrun")
    assert not d.is_main


def test_detect_torchrun_defaults():
    d = detect({"RANK": "0", "WORLD_SIZE": "2"})
    assert d == DistEnv(0, 2, 0, "127.0.0.1", DEFAULT_PORT, "torchrun")
    assert d.is_main


def test_detect_torchrun_inside_srun_prefers_torch_variables():
    env = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "3",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29400",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "1",
        "SLURM_JOB_ID": "777",
    }
    assert detect(env) == DistEnv(3, 4, 3, "10.0.0.1", 29400, "torchrun")


def test_detect_srun_with_job_port(no_scontrol):
    env = {
        "SLURM_PROCID": "6",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "2",
        "SLURM_JOB_NODELIST": "gpu[003-005,007]",
        "SLURM_JOB_ID": "123456",
    }
    d = detect(env)
    assert d == DistEnv(6, 16, 2, "gpu003", 20000 + 123456 % 20000, "srun")
    assert d.master_port == 23456


def test_detect_srun_explicit_master_variables_win(no_scontrol):
    env = {
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_JOB_NODELIST": "gpu[003-005,007]",
        "SLURM_JOB_ID": "123456",
        "MASTER_ADDR": "headnode",
        "MASTER_PORT": "31000",
    }
    d = detect(env)
    assert (d.master_addr, d.master_port, d.local_rank, d.launcher) == (
        "headnode",
        31000,
        0,
        "srun",
    )


def test_detect_srun_step_nodelist_preferred(no_scontrol):
    env = {
        "SLURM_PROCID": "1",
        "SLURM_NTASKS": "2",
        "SLURM_LOCALID": "0",
        "SLURM_STEP_NODELIST": "gpu[010-011]",
        "SLURM_JOB_NODELIST": "gpu[003-011]",
    }
    d = detect(env)
    assert d.master_addr == "gpu010"
    assert d.master_port == DEFAULT_PORT  # no job id, no MASTER_PORT


def test_detect_srun_without_nodelist():
    d = detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert d == DistEnv(0, 1, 0, "127.0.0.1", DEFAULT_PORT, "srun")


def test_detect_srun_uses_scontrol_when_present(fake_scontrol):
    d = detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "gpu[1-2]"})
    assert d.master_addr == "from-scontrol-a"


def test_detect_single_process():
    single = detect({})
    assert single.launcher == "single" and (single.rank, single.world_size) == (0, 1)
    # No launcher picked a port: one the OS says is free, so two lone processes differ.
    assert single.master_port != DEFAULT_PORT and single.master_port != detect({}).master_port
    assert detect({"MASTER_PORT": "1234"}).master_port == 1234


def test_detect_reads_os_environ_by_default(monkeypatch):
    for name in list(os.environ):
        if name.startswith("SLURM_") or name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("MASTER_PORT", "29999")
    d = detect()
    assert (d.rank, d.world_size, d.master_port, d.launcher) == (1, 3, 29999, "torchrun")


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"RANK": "zero", "WORLD_SIZE": "2"}, "RANK"),
        ({"RANK": "0", "WORLD_SIZE": "2.0"}, "WORLD_SIZE"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": ""}, "LOCAL_RANK"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "port"}, "MASTER_PORT"),
        ({"SLURM_PROCID": "x", "SLURM_NTASKS": "2"}, "SLURM_PROCID"),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "12_3a"}, "SLURM_JOB_ID"),
        ({"MASTER_PORT": "abc"}, "MASTER_PORT"),
    ],
)
def test_non_integer_variable_is_a_clear_error(env, name):
    with pytest.raises(ValueError, match=rf"environment variable {name}=.* is not an integer"):
        detect(env)


# -- first_host ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [
        ("gpu[003-005,007]", "gpu003"),
        ("gpu[003-005,007],cpu1", "gpu003"),
        ("gpu[007,003-005]", "gpu007"),  # first as listed, like scontrol
        ("node7", "node7"),
        ("node7,node9", "node7"),
        ("cpu1,gpu[1-2]", "cpu1"),
        ("gpu[10]", "gpu10"),
        ("rack-1-[02-04]", "rack-1-02"),
        ("a100-gpu[0001-0016]", "a100-gpu0001"),
        ("  gpu[3-4] ", "gpu3"),
    ],
)
def test_first_host_parser(no_scontrol, nodelist, host):
    assert first_host(nodelist) == host


def test_first_host_parser_keeps_suffix(no_scontrol):
    assert first_host("node[01-02]-ib") == "node01-ib"


def test_first_host_prefers_scontrol(fake_scontrol):
    assert first_host("gpu[003-005,007]") == "from-scontrol-a"


def test_first_host_falls_back_when_scontrol_fails(tmp_path, monkeypatch):
    bin_dir = tmp_path / "failing_bin"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text("#!/bin/sh\necho 'scontrol: error: no controller' >&2\nexit 1\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    assert first_host("gpu[003-005,007]") == "gpu003"


def test_first_host_falls_back_when_scontrol_prints_nothing(tmp_path, monkeypatch):
    bin_dir = tmp_path / "silent_bin"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    assert first_host("gpu[5-6]") == "gpu5"


def test_first_host_unparsable(no_scontrol):
    with pytest.raises(ValueError, match="cannot parse the Slurm node list"):
        first_host("[1-2]")


def test_a_single_process_eval_group_leaves_the_environment_alone(monkeypatch):
    """An in-process mmdit-eval must not leak RANK/WORLD_SIZE/MASTER_PORT into the jobs the
    same process launches later (they would all think they are rank 0 of 1)."""
    from mmdit.distributed import init_process_group

    for name in ("RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    import os

    before = dict(os.environ)
    init_process_group(detect({}))
    assert dict(os.environ) == before
