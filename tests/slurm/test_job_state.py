"""slurm.job_state without a cluster: fake `scontrol` and `sacct` on PATH answer each call from
a script, so the decisions (which source, which states are final, when to give up) are
tested on exactly the sequences a real cluster produces -- the lag of issue 21 included."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from slurm import job_state
from slurm.job_state import (
    JobStateError,
    JobStateTimeout,
    Observation,
    current_state,
    normalize,
    parse_sacct,
    parse_scontrol,
    wait_for_final_state,
)
from slurm.submit import follow, job_is_alive, main

REPO = Path(__file__).resolve().parents[2]
UNKNOWN = None  # the controller's answer for a job it does not know (exit 1)

FAKE = f"""#!{sys.executable}
import json, pathlib, sys
me = pathlib.Path(__file__)
answers = json.loads(me.with_suffix(".json").read_text())
count = me.with_suffix(".count")
n = int(count.read_text()) if count.exists() else 0
count.write_text(str(n + 1))
with open(me.with_suffix(".log"), "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
answer = answers[min(n, len(answers) - 1)]
if answer is None:
    sys.exit("slurm_load_jobs error: Invalid job id specified")
sys.stdout.write(answer)
"""


def scontrol_line(state: str, job_id: str = "42") -> str:
    return f"JobId={job_id} JobName=wrap JobState={state} Reason=None Requeue=1 Restarts=0\n"


class FakeSlurm:
    """Programs in a directory that is the whole PATH; each answers its i-th call with
    answers[i] (the last one repeats) and logs its arguments."""

    def __init__(self, bin_dir: Path):
        self.bin_dir = bin_dir

    def program(self, name: str, answers: list[str | None]) -> None:
        exe = self.bin_dir / name
        exe.write_text(FAKE)
        exe.chmod(0o755)
        exe.with_suffix(".json").write_text(json.dumps(answers))

    def scontrol(self, *states: str | None) -> None:
        self.program("scontrol", [s if s is UNKNOWN else scontrol_line(s) for s in states])

    def sacct(self, *states: str) -> None:
        self.program("sacct", [f"{s}\n" if s else "" for s in states])

    def calls(self, name: str) -> list[str]:
        log = self.bin_dir / f"{name}.log"
        return log.read_text().splitlines() if log.exists() else []


@pytest.fixture
def fake(tmp_path, monkeypatch) -> FakeSlurm:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    return FakeSlurm(bin_dir)


# -- parsing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "state"),
    [
        ("CANCELLED by 0", "CANCELLED"),
        ("CANCELLED+", "CANCELLED"),
        ("  COMPLETED\n", "COMPLETED"),
        ("out_of_memory", "OUT_OF_MEMORY"),
        ("", ""),
    ],
)
def test_normalize(raw, state):
    assert normalize(raw) == state


def test_sacct_reports_the_latest_run_of_a_requeued_job():
    assert parse_sacct("REQUEUED\nCOMPLETED\n") == "COMPLETED"
    assert parse_sacct("\n") == ""  # the record is not in the database yet


def test_scontrol_array_job_is_final_only_when_every_task_is():
    text = scontrol_line("COMPLETED", "7_0") + scontrol_line("RUNNING", "7_1")
    assert parse_scontrol(text) == "RUNNING"
    assert parse_scontrol(scontrol_line("CANCELLED", "7_0")) == "CANCELLED"
    assert parse_scontrol("") == ""


# -- which source ---------------------------------------------------------------------------


def test_the_controller_is_asked_first_and_sacct_only_when_it_forgot_the_job(fake):
    fake.scontrol("COMPLETED")
    fake.sacct("RUNNING")  # lagging: must not be consulted
    assert current_state("42") == Observation("COMPLETED", "scontrol")
    assert fake.calls("scontrol") == ["show job -o 42"]
    assert fake.calls("sacct") == []

    fake.scontrol(UNKNOWN)
    fake.sacct("CANCELLED by 0")
    assert current_state("42") == Observation("CANCELLED", "sacct")
    assert fake.calls("sacct") == ["-n -X -P -j 42 -o State"]


def test_accounting_only_never_asks_the_controller(fake):
    fake.scontrol("COMPLETED")
    fake.sacct("RUNNING")
    assert current_state("42", accounting_only=True) == Observation("RUNNING", "sacct")
    assert fake.calls("scontrol") == []


def test_missing_client_programs_are_named(fake):
    with pytest.raises(JobStateError, match=r"`scontrol` is not on PATH.*slurm-client"):
        current_state("42")


# -- waiting -------------------------------------------------------------------------------


def test_issue_21_queue_forgot_the_job_while_sacct_still_says_running(fake):
    """The race: squeue and the controller no longer know the job, the accounting database
    says RUNNING for a few polls, then COMPLETED. The wait must return COMPLETED."""
    fake.scontrol(UNKNOWN)
    fake.sacct("RUNNING", "RUNNING", "RUNNING", "COMPLETED")
    changes = []
    state = wait_for_final_state(
        "42", timeout_s=30, poll_s=0.01, on_change=lambda obs, t: changes.append(obs)
    )
    assert state == "COMPLETED"
    assert len(fake.calls("sacct")) == 4
    assert changes == [Observation("RUNNING", "sacct"), Observation("COMPLETED", "sacct")]


def test_a_requeued_job_is_followed_until_its_second_run_ends(fake):
    fake.scontrol("RUNNING", "COMPLETING", "PENDING", "RUNNING", "COMPLETED")
    assert wait_for_final_state("42", timeout_s=30, poll_s=0.01) == "COMPLETED"
    assert len(fake.calls("scontrol")) == 5
    # What sacct alone shows for the same job: no record yet, then the requeued run.
    fake.sacct("", "PENDING", "RUNNING", "REQUEUED", "PENDING", "RUNNING", "COMPLETED")
    assert wait_for_final_state("42", 30, 0.01, accounting_only=True) == "COMPLETED"
    assert len(fake.calls("sacct")) == 7


@pytest.mark.parametrize("final", ["FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"])
def test_other_final_states_end_the_wait(fake, final):
    fake.scontrol("RUNNING", final)
    assert wait_for_final_state("42", timeout_s=30, poll_s=0.01) == final


class FakeClock:
    """time.monotonic and time.sleep for job_state: sleeping advances the clock."""

    def __init__(self):
        self.now, self.sleeps = 1000.0, []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_timeout_names_the_job_the_time_and_every_state_seen(fake, monkeypatch):
    # The real programs answer, on a clock that only sleeping advances: how many polls fit
    # before the deadline must not depend on how fast a loaded machine starts processes.
    clock = FakeClock()
    monkeypatch.setattr(
        job_state, "time", SimpleNamespace(monotonic=clock.monotonic, sleep=clock.sleep)
    )
    fake.scontrol("PENDING", "PENDING", UNKNOWN, "RUNNING")
    fake.sacct("")
    with pytest.raises(JobStateTimeout) as info:
        wait_for_final_state("42", timeout_s=0.5, poll_s=0.05)
    err = info.value
    assert [obs for obs, _ in err.seen] == [
        Observation("PENDING", "scontrol"),
        Observation("", "sacct"),
        Observation("RUNNING", "scontrol"),
    ]
    assert [round(t, 2) for _, t in err.seen] == [0, 0.1, 0.15]  # polled every 0.05 s
    assert err.elapsed_s == pytest.approx(0.5)
    message = str(err)
    assert message.startswith("job 42: no final state after ")
    assert "PENDING (scontrol) at 0 s, unknown (sacct) at " in message
    assert "RUNNING (scontrol)" in message and "`scancel 42`" in message


def test_polls_slow_down_with_the_time_waited_and_stop_at_the_deadline(monkeypatch):
    clock = FakeClock()
    fake_time = SimpleNamespace(monotonic=clock.monotonic, sleep=clock.sleep)
    monkeypatch.setattr(job_state, "time", fake_time)
    monkeypatch.setattr(job_state, "current_state", lambda *a, **k: Observation("RUNNING", "x"))
    with pytest.raises(JobStateTimeout) as info:
        wait_for_final_state("42", timeout_s=100, poll_s=1, max_poll_s=3)
    sleeps = clock.sleeps
    assert sleeps[:20] == [1] * 20  # poll_s while elapsed / 20 <= 1 s
    assert 1 < sleeps[25] < 3 and max(sleeps) == 3  # then a 20th of the time waited, capped
    assert sum(sleeps) == pytest.approx(100)  # the last sleep ends at the deadline
    assert info.value.elapsed_s == pytest.approx(100)


# -- what mmdit-submit builds on it --------------------------------------------------------


@pytest.mark.parametrize(
    ("controller", "accounting", "alive"),
    [
        ("PENDING", "", True),
        ("RUNNING", "RUNNING", True),
        ("COMPLETING", "REQUEUED", True),  # just requeued: it runs again
        ("REQUEUED", "REQUEUED", True),
        ("COMPLETED", "RUNNING", False),
        (UNKNOWN, "RUNNING", False),  # a stale accounting record is not a live job
        (UNKNOWN, "", False),
    ],
)
def test_job_is_alive(fake, controller, accounting, alive):
    fake.scontrol(controller)
    fake.sacct(accounting)
    assert job_is_alive("42") is alive


def test_wait_prints_each_state_once_and_succeeds_on_completed(fake, capsys):
    fake.scontrol("PENDING", "PENDING", "RUNNING", "RUNNING", "COMPLETED")
    assert follow("42", timeout_s=30, poll_s=0.01) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in lines] == [
        "job 42: PENDING",
        "job 42: RUNNING",
        "job 42: COMPLETED",
    ]


def test_wait_fails_with_the_final_state_and_on_timeout(fake, capsys):
    fake.scontrol("RUNNING", "FAILED")
    assert follow("42", timeout_s=30, poll_s=0.01) == 1
    assert "job 42 ended FAILED, not COMPLETED" in capsys.readouterr().err
    fake.scontrol("RUNNING")
    assert follow("42", timeout_s=0.2, poll_s=0.05) == 3
    err = capsys.readouterr().err
    assert "--wait-timeout: job 42: no final state after" in err and "RUNNING (scontrol)" in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--wait", "--dry-run"], "--dry-run and --emit-sbatch submit none"),
        (["--wait", "--emit-sbatch", "-"], "--dry-run and --emit-sbatch submit none"),
        (["--wait-timeout", "60"], "--wait-timeout is for --wait"),
        (["--wait", "--ladder", str(REPO / "configs/scaling/ladder_demo.yaml")], "one per rung"),
    ],
)
def test_wait_flag_combinations_that_follow_nothing_are_refused(flags, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--config", str(REPO / "configs/debug_cpu.yaml"), *flags])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
