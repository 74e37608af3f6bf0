"""The watchdog on its own: section limits, the adaptive step limit, finding the stuck rank from
heartbeats, the report, the records, the exit status. Real processes stopped with SIGSTOP or killed
under torchrun are in tests/training/test_faults.py, a hung Slurm job's requeue in
tests/slurm/test_submit_cluster.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from training.watchdog import EXIT_HUNG, FAULTS_FILE, Beat, Limits, Watchdog

LIMITS = Limits(setup=30.0, step=0.6, checkpoint=30.0, eval=30.0)


def _watchdog(tmp_path, rank=0, world=1, limits=LIMITS, **kw):
    codes = []
    done = threading.Event()

    def exit_process(code):
        codes.append(code)
        done.set()

    wd = Watchdog(tmp_path, rank, world, limits, heartbeat_s=0.2, exit_process=exit_process, **kw)
    return wd, codes, done


def test_a_step_over_its_limit_reports_and_exits_with_the_hang_status(tmp_path, capsys):
    wd, codes, done = _watchdog(tmp_path)
    wd.enter("step", 0)
    wd.enter("step", 1)  # one step done: the step limit (not set-up's) applies now
    wd.start()
    assert done.wait(10), "the watchdog never fired"
    assert codes == [EXIT_HUNG]
    err = capsys.readouterr().err
    assert "hang: rank 0 on" in err and "has been in step at step 1 for" in err
    assert "(limit 0.6 s)" in err
    record = json.loads((tmp_path / FAULTS_FILE).read_text().splitlines()[-1])
    assert record["event"] == "hang" and record["section"] == "step" and record["step"] == 1
    metrics = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics == record  # the final metrics record


def test_sections_within_their_limits_never_fire(tmp_path):
    # Steps 15x shorter than their limit, so a loaded machine's scheduling delays stay inside.
    limits = Limits(setup=30.0, step=1.5, checkpoint=30.0, eval=30.0)
    wd, codes, _ = _watchdog(tmp_path, limits=limits)
    wd.start()
    for step in range(8):  # quick steps, a checkpoint and an eval longer than a step's limit
        wd.enter("step", step)
        time.sleep(0.1)
        if step == 4:
            wd.enter("checkpoint")
            time.sleep(2.0)
            wd.enter("eval")
            time.sleep(2.0)
    wd.stop()
    assert codes == []
    beat = Beat.read(tmp_path / "heartbeats" / "rank_00000.json")
    assert beat is not None and beat.section == "step" and beat.step >= 5 and beat.seq > 5


def test_the_first_step_gets_the_setup_limit_and_later_steps_adapt(tmp_path):
    limits = Limits(setup=100.0, step=1.0, checkpoint=0, eval=0, step_factor=3.0)
    wd, _, _ = _watchdog(tmp_path, limits=limits)
    wd.enter("step", 0)
    assert wd.limit("step") == 100.0  # compiling, warming up: no step seen yet
    wd._steps.extend([0.1, 0.2])
    assert wd.limit("step") == 1.0  # the floor: 3 x 0.2 s is shorter
    wd._steps.append(2.0)
    assert wd.limit("step") == pytest.approx(6.0)  # 3 x the slowest recent step
    assert wd.limit("checkpoint") == 0  # 0 = no limit
    with pytest.raises(ValueError, match="unknown watchdog section 'save'"):
        wd.enter("save")


def test_the_stuck_rank_is_the_one_whose_heartbeat_stops(tmp_path, capsys):
    """Three ranks: 0 and 2 wait in a collective (their threads beat), 1 is stopped (its
    heartbeat file never changes). Both waiting ranks name rank 1, and only rank 0 (the
    lowest live one) writes the records."""
    beats = tmp_path / "heartbeats"
    beats.mkdir()
    frozen = Beat(rank=1, host="node-b", pid=999999, section="step", step=7, seq=3, in_section_s=2)
    (beats / "rank_00001.json").write_text(json.dumps(frozen.__dict__))
    rank0, codes0, done0 = _watchdog(tmp_path, rank=0, world=3)
    rank2, codes2, done2 = _watchdog(tmp_path, rank=2, world=3)
    for wd in (rank0, rank2):
        wd.enter("step", 7)
        wd._steps.append(0.1)
        wd.start()
    assert done0.wait(15) and done2.wait(15)
    assert codes0 == codes2 == [EXIT_HUNG]
    err = capsys.readouterr().err
    assert err.count("Stuck: rank 1 on node-b (pid 999999) in step at step 7") == 2
    records = (tmp_path / FAULTS_FILE).read_text().splitlines()
    assert len(records) == 1
    record = json.loads(records[0])
    assert record["reported_by"] == 0 and record["stuck"] == [{"rank": 1, "host": "node-b"}]


def test_a_rank_that_never_beat_is_named(tmp_path, capsys):
    wd, codes, done = _watchdog(tmp_path, rank=0, world=2)
    wd.enter("step", 3)
    wd._steps.append(0.1)
    wd.start()
    assert done.wait(15) and codes == [EXIT_HUNG]
    assert "Stuck: rank 1 (never sent a heartbeat)" in capsys.readouterr().err


def test_a_stopped_rank_on_this_host_is_killed(tmp_path):
    """What ends a SIGSTOPped rank on the same node: a stopped process ignores SIGTERM until
    continued, so the launcher's polite stop would wait; SIGKILL ends it."""
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.kill(victim.pid, signal.SIGSTOP)
        beats = tmp_path / "heartbeats"
        beats.mkdir()
        host = Watchdog(tmp_path, 0, 1, LIMITS).host
        stuck = Beat(
            rank=1, host=host, pid=victim.pid, section="step", step=2, seq=1, in_section_s=0
        )
        (beats / "rank_00001.json").write_text(json.dumps(stuck.__dict__))
        wd, codes, done = _watchdog(tmp_path, rank=0, world=2)
        wd.enter("step", 2)
        wd._steps.append(0.1)
        wd.start()
        assert done.wait(15) and codes == [EXIT_HUNG]
        assert victim.wait(timeout=10) == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            victim.kill()


def test_a_heartbeat_left_by_an_earlier_start_is_not_taken_for_a_rank(tmp_path, capsys):
    """After a restart, rank 1's old heartbeat names a pid that may now be another process:
    it counts as no heartbeat, and that process is left alone."""
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        beats = tmp_path / "heartbeats"
        beats.mkdir()
        host = Watchdog(tmp_path, 0, 1, LIMITS).host
        old = Beat(
            rank=1,
            host=host,
            pid=bystander.pid,
            section="step",
            step=2,
            seq=1,
            in_section_s=0,
            incarnation="earlier",
        )
        (beats / "rank_00001.json").write_text(json.dumps(old.__dict__))
        wd, codes, done = _watchdog(tmp_path, rank=0, world=2, incarnation="now")
        wd.enter("step", 2)
        wd._steps.append(0.1)
        wd.start()
        assert done.wait(15) and codes == [EXIT_HUNG]
        assert "Stuck: rank 1 (never sent a heartbeat)" in capsys.readouterr().err
        time.sleep(0.5)
        assert bystander.poll() is None  # not killed
    finally:
        bystander.kill()
