"""A real Slurm cluster on the local machine (one node, or two), for tests and demos.

One module, one class: the daemons' directories, ports, configs, start and stop order share
the root layout below, and it imports nothing from the project (the tests start it alone).

Debian's ``slurm-wlm``, ``munge``, ``slurmdbd`` and ``mariadb-server`` (``make slurm-deps``)
are started directly -- no systemd -- with every file under one root directory::

    root/etc   munge.key, slurm.conf, slurmdbd.conf (mode 600)
    root/run   <daemon>.pid, munge/ (socket dir, mode 711), mariadb.sock
    root/log   <daemon>.log (the daemons' own logs) and <daemon>.out (their stdout/stderr)
    root/state slurmctld state, slurmd spool, MariaDB data directory

The daemons run in the foreground of their own sessions (so they outlive the process that
started them) on free TCP ports on 127.0.0.1, so two clusters, or a stale one, never collide.
Each cluster also numbers its jobs from its own block of ids (``FirstJobId``), because a job's
rendezvous port derives from its id: two clusters counting from 1 would give their jobs the
same ports.
One node, ``localhost``, exposes ``cpus`` CPUs (as many tasks) in one partition. With
``nodes=2`` two slurmd (Slurm runs several on one host when each node has its own port) are
nodes ``127.0.0.1`` and ``127.0.0.2``: a job's first node name becomes its MASTER_ADDR, as on
a cluster, so each name must reach this machine, and all of 127.0.0.0/8 does. Accounting
(slurmdbd + MariaDB) is on, because submitit follows job state with ``sacct``.

    with LocalSlurmCluster(Path("/tmp/slurm")) as cluster:
        subprocess.run(["srun", "-n", "2", "hostname"], env={**os.environ, **cluster.env})

or from a shell: ``python -m slurm.local_cluster start --root /tmp/slurm`` (prints the
``export SLURM_CONF=...`` line), ``... status --root /tmp/slurm``, ``... stop --root /tmp/slurm``.

Must run as root (SlurmUser=root). This module imports nothing from the rest of the project.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["LocalSlurmCluster", "SlurmClusterError", "missing_binaries", "main"]

# Start order; stop goes in reverse. A 2-node cluster has one slurmd per node instead of
# "slurmd" (LocalSlurmCluster.daemons).
DAEMONS = ("munged", "mariadb", "slurmdbd", "slurmctld", "slurmd")
# Each daemon's /proc/PID/comm, so that a recycled pid in a stale pid file is not taken for it.
_COMM = {"mariadb": "mariadbd"}

REQUIRED_BINARIES = (
    "munged",
    "mariadb-install-db",
    "mariadbd",
    "mariadb",
    "slurmdbd",
    "slurmctld",
    "slurmd",
    "sacctmgr",
    "sinfo",
    "squeue",
    "scancel",
    "sbatch",
    "srun",
    "sacct",
)

_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")
_UNIX_SOCKET_MAX = 107

# Jobs take MASTER_PORT = 20000 + job id % 20000 (mmdit.distributed, slurm/templates). Each
# cluster starts its ids in a block of 100 of its own; blocks 1..126 (ids 101 ... 12700) keep
# those ports below Linux's ephemeral range (32768+), where the OS hands out the free ports
# that other programs (and these daemons) bind.
_JOB_ID_BLOCK = 100
_JOB_ID_BLOCKS = range(1, 127)


class SlurmClusterError(RuntimeError):
    """The local cluster could not be started, or another one already runs under the root."""


def _slurmd(node: str) -> str:
    """The daemon name (pid and log files) of the slurmd of `node` in a multi-node cluster."""
    return f"slurmd-{node}"


def _which(name: str) -> str | None:
    path = os.environ.get("PATH", "")
    return shutil.which(name, path=os.pathsep.join([path, *_SBIN_DIRS]))


def missing_binaries() -> list[str]:
    """The programs the cluster needs that are not installed (empty when all are)."""
    return [name for name in REQUIRED_BINARIES if _which(name) is None]


def _free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now (held together while picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _running_first_job_ids() -> set[int]:
    """FirstJobId of every local cluster whose slurmctld runs on this machine now (read from
    the slurm.conf named by its SLURM_CONF)."""
    found = set()
    proc = Path("/proc")
    for entry in proc.iterdir() if proc.is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "slurmctld":
                continue
            env = (entry / "environ").read_bytes().split(b"\0")
            conf = next(v[len(b"SLURM_CONF=") :] for v in env if v.startswith(b"SLURM_CONF="))
            match = re.search(r"^FirstJobId=(\d+)", Path(conf.decode()).read_text(), re.M)
        except (OSError, StopIteration, UnicodeDecodeError):
            continue
        if match:
            found.add(int(match.group(1)))
    return found


def pick_first_job_id(in_use: set[int]) -> int:
    """The first job id of a new cluster: a block whose job ports no cluster in ``in_use``
    (their first job ids) covers; random, so clusters starting at once rarely pick alike."""
    taken = {(i % 20000) // _JOB_ID_BLOCK for i in in_use}
    free = [b for b in _JOB_ID_BLOCKS if b not in taken] or list(_JOB_ID_BLOCKS)
    # SystemRandom: test runners seed `random` alike in every session.
    return random.SystemRandom().choice(free) * _JOB_ID_BLOCK + 1


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:]) or "(empty)"


class LocalSlurmCluster:
    """A single-node Slurm cluster (with accounting) whose files all live under ``root``."""

    def __init__(
        self,
        root: Path | str,
        cpus: int = 2,
        cluster_name: str = "mmdit-local",
        partition: str = "debug",
        start_timeout: float = 60.0,
        nodes: int = 1,
    ) -> None:
        if nodes not in (1, 2):
            raise SlurmClusterError(
                f"nodes={nodes}: the local cluster has 1 node (localhost) or 2 (127.0.0.1 and "
                "127.0.0.2)"
            )
        # A second node needs a second name that resolves here, as a job's first node name
        # becomes its MASTER_ADDR: the nodes of a 2-node cluster are named by their own
        # loopback addresses (all of 127.0.0.0/8 reaches this machine).
        self.node_names = ["localhost"] if nodes == 1 else ["127.0.0.1", "127.0.0.2"]
        self.daemons = DAEMONS if nodes == 1 else (*DAEMONS[:-1], *map(_slurmd, self.node_names))
        self.root = Path(root).absolute()
        self.cpus = int(cpus)
        self.cluster_name = cluster_name.lower()  # Slurm lower-cases cluster names
        self.partition = partition
        self.start_timeout = float(start_timeout)
        self._procs: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}  # daemon -> TCP port on 127.0.0.1, set by start()
        self.first_job_id: int | None = None  # set by start()
        self.start_seconds: float | None = None  # how long the last start() took

    # ----- paths -----------------------------------------------------------------------------

    @property
    def etc(self) -> Path:
        return self.root / "etc"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def slurm_conf(self) -> Path:
        return self.etc / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.run_dir / "munge" / "munge.socket.2"

    @property
    def mariadb_socket(self) -> Path:
        return self.run_dir / "mariadb.sock"

    def pid_file(self, daemon: str) -> Path:
        return self.run_dir / f"{daemon}.pid"

    def log_file(self, daemon: str) -> Path:
        return self.log_dir / f"{daemon}.log"

    @property
    def env(self) -> dict[str, str]:
        """What client commands (sbatch, srun, sacct, submitit) need: add it to os.environ.

        ``SLURM_CONF`` is enough: slurm.conf names the munge socket (``AuthInfo``) and the ports.
        """
        return {"SLURM_CONF": str(self.slurm_conf)}

    # ----- pids ------------------------------------------------------------------------------

    def pids(self) -> dict[str, int]:
        """The recorded pid of each daemon that has a pid file."""
        out = {}
        for daemon in self.daemons:
            with contextlib.suppress(OSError, ValueError, IndexError):
                out[daemon] = int(self.pid_file(daemon).read_text().split()[0])
        return out

    def alive_pids(self) -> dict[str, int]:
        return {d: p for d, p in self.pids().items() if self._alive(d, p)}

    def _alive(self, daemon: str, pid: int) -> bool:
        proc = self._procs.get(daemon)
        if proc is not None and proc.pid == pid:
            return proc.poll() is None
        if not _pid_alive(pid):
            return False
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            return True
        program = "slurmd" if daemon.startswith("slurmd-") else daemon
        return comm == _COMM.get(program, program)

    def is_running(self) -> bool:
        """True if every daemon of this cluster is alive."""
        alive = self.alive_pids()
        return all(d in alive for d in self.daemons)

    # ----- start -----------------------------------------------------------------------------

    def start(self) -> LocalSlurmCluster:
        """Write the configuration, start the daemons and wait until the node is idle."""
        if os.geteuid() != 0:
            raise SlurmClusterError("the local Slurm cluster runs its daemons as root; run as root")
        missing = missing_binaries()
        if missing:
            raise SlurmClusterError(
                f"missing programs: {', '.join(missing)}; install them with `make slurm-deps` "
                "(apt-get install slurm-wlm munge slurmdbd mariadb-server)"
            )
        alive = self.alive_pids()
        if alive:
            raise SlurmClusterError(
                f"a cluster already runs under {self.root} (pids {alive}); stop it first with "
                f"`python -m slurm.local_cluster stop --root {self.root}`"
            )
        if len(str(self.munge_socket)) > _UNIX_SOCKET_MAX:
            raise SlurmClusterError(f"root path too long for a unix socket: {self.root}")
        for d in self.daemons:
            self.pid_file(d).unlink(missing_ok=True)
        t0 = time.monotonic()
        try:
            self._write_config()
            self._start_munged()
            self._start_mariadb()
            self._spawn("slurmdbd", ["slurmdbd", "-D"])
            self._register_cluster()
            self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
            for daemon, node in zip(self.slurmds, self.node_names, strict=True):
                self._spawn(daemon, ["slurmd", "-D", "-N", node])
            self._wait_idle()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    @property
    def slurmds(self) -> tuple[str, ...]:
        return self.daemons[len(DAEMONS) - 1 :]

    def _write_config(self) -> None:
        """The directories, the munge key, free ports, a job-id block and the two configs."""
        self._make_dirs()
        self._write_munge_key()
        ctld_port, dbd_port, db_port, *slurmd_ports = _free_ports(3 + len(self.slurmds))
        self.ports = {"slurmctld": ctld_port, "slurmdbd": dbd_port, "mariadb": db_port}
        self.ports.update(zip(self.slurmds, slurmd_ports, strict=True))
        self.first_job_id = pick_first_job_id(_running_first_job_ids())
        self.slurm_conf.write_text(self._slurm_conf_text(ctld_port, dbd_port, slurmd_ports))
        (self.etc / "plugstack.conf").write_text("")
        dbd = self.etc / "slurmdbd.conf"
        dbd.write_text(self._slurmdbd_conf_text(dbd_port, db_port))
        dbd.chmod(0o600)  # slurmdbd refuses a world-readable config (it holds a password)

    def _make_dirs(self) -> None:
        for d in (self.etc, self.run_dir, self.log_dir, self.state_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        (self.run_dir / "munge").mkdir(exist_ok=True)
        (self.run_dir / "munge").chmod(0o711)
        for sub in ("slurmctld", *self.slurmds):
            (self.state_dir / sub).mkdir(exist_ok=True)

    def _write_munge_key(self) -> None:
        key = self.etc / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        key.chmod(0o400)

    def _slurm_conf_text(self, ctld_port: int, dbd_port: int, slurmd_ports: list[int]) -> str:
        # One node: the files of its slurmd as before. Two: each slurmd has its own port,
        # spool, pid and log file (%n: the node name).
        slurmd = self.slurmds[0] if len(self.slurmds) == 1 else "slurmd-%n"
        nodes = "\n".join(
            f"NodeName={name} NodeAddr={'127.0.0.1' if name == 'localhost' else name} Port={port} "
            f"CPUs={self.cpus} State=UNKNOWN"
            for name, port in zip(self.node_names, slurmd_ports, strict=True)
        )
        r, munge = self.root, self.munge_socket
        return f"""\
# Written by slurm/local_cluster.py: a {len(self.node_names)}-node cluster under {r}. No cgroups.
ClusterName={self.cluster_name}
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_ports[0]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job may start again only after this many seconds (default 120).
AuthInfo=socket={munge},cred_expire=10
StateSaveLocation={r}/state/slurmctld
SlurmdSpoolDir={r}/state/{slurmd}
SlurmctldPidFile={self.pid_file("slurmctld")}
SlurmdPidFile={self.pid_file(slurmd)}
SlurmctldLogFile={self.log_file("slurmctld")}
SlurmdLogFile={self.log_file(slurmd)}
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={r}/etc/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=3
JobRequeue=1
MaxJobCount=10000
# Its own block of job ids, hence of job rendezvous ports (see pick_first_job_id).
FirstJobId={self.first_job_id}
MinJobAge=300
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={dbd_port}
# slurmdbd connections ignore AuthInfo's socket: name the munge socket here too.
AccountingStoragePass={munge}
JobCompType=jobcomp/none
{nodes}
PartitionName={self.partition} Nodes={",".join(self.node_names)} Default=YES MaxTime=INFINITE \
State=UP
"""

    def _slurmdbd_conf_text(self, dbd_port: int, db_port: int) -> str:
        return f"""\
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={dbd_port}
SlurmUser=root
PidFile={self.pid_file("slurmdbd")}
LogFile={self.log_file("slurmdbd")}
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={db_port}
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
"""

    def _daemon_env(self) -> dict[str, str]:
        # A cluster started from inside a Slurm job must not inherit that job's SLURM_* vars.
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["PATH"] = os.pathsep.join([env.get("PATH", ""), *_SBIN_DIRS])
        env.update(self.env)
        return env

    def _spawn(self, daemon: str, argv: Sequence[str]) -> subprocess.Popen:
        exe = _which(argv[0]) or argv[0]
        with open(self.log_dir / f"{daemon}.out", "ab") as out:
            proc = subprocess.Popen(
                [exe, *argv[1:]],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self._daemon_env(),
                cwd=self.root,
                start_new_session=True,  # outlives the starter; our signals do not reach it
            )
        self._procs[daemon] = proc
        self.pid_file(daemon).write_text(f"{proc.pid}\n")
        return proc

    def _run(self, argv: Sequence[str], timeout: float = 30.0, check: bool = True):
        exe = _which(argv[0]) or argv[0]
        res = subprocess.run(
            [exe, *argv[1:]],
            capture_output=True,
            text=True,
            env=self._daemon_env(),
            timeout=timeout,
        )
        if check and res.returncode != 0:
            raise SlurmClusterError(
                f"{' '.join(argv)} failed ({res.returncode}):\n{res.stdout}{res.stderr}"
            )
        return res

    def _wait_for(self, what: str, ready, daemons: Sequence[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if ready():
                return
            dead = [d for d in daemons if d in self._procs and self._procs[d].poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"timed out after {timeout:.0f} s"
                raise SlurmClusterError(f"{what}: {why}\n{self.log_tails()}")
            time.sleep(0.1)

    def _start_munged(self) -> None:
        self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={self.etc / 'munge.key'}",
                f"--pid-file={self.run_dir / 'munged.own.pid'}",
                f"--log-file={self.log_file('munged')}",
                f"--seed-file={self.state_dir / 'munged.seed'}",
            ],
        )
        self._wait_for("munged", self.munge_socket.exists, ["munged"], 20)

    def _start_mariadb(self) -> None:
        datadir = self.state_dir / "mariadb"
        if not (datadir / "mysql").is_dir():
            self._run(
                [
                    "mariadb-install-db",
                    "--no-defaults",
                    f"--datadir={datadir}",
                    "--user=root",
                    "--auth-root-authentication-method=normal",
                    "--skip-test-db",
                    "--skip-name-resolve",
                ],
                timeout=120,
            )
        self._spawn(
            "mariadb",
            [
                "mariadbd",
                "--no-defaults",
                f"--datadir={datadir}",
                f"--socket={self.mariadb_socket}",
                f"--port={self.ports['mariadb']}",
                "--bind-address=127.0.0.1",
                f"--pid-file={self.run_dir / 'mariadbd.own.pid'}",
                f"--log-error={self.log_file('mariadb')}",
                "--user=root",
                "--skip-name-resolve",
                "--skip-log-bin",
                "--innodb-use-native-aio=0",
                "--innodb-buffer-pool-size=32M",
                "--innodb-lock-wait-timeout=900",  # what slurmdbd asks for
            ],
        )
        sql = (
            "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm'; "
            "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm'; "
            "GRANT ALL ON *.* TO 'slurm'@'127.0.0.1'; GRANT ALL ON *.* TO 'slurm'@'localhost'; "
            "FLUSH PRIVILEGES;"
        )
        client = ["mariadb", "--no-defaults", f"--socket={self.mariadb_socket}", "-uroot"]

        def ready() -> bool:
            if not self.mariadb_socket.exists():
                return False
            return self._run([*client, "-e", sql], check=False).returncode == 0

        self._wait_for("mariadb", ready, ["mariadb"], 60)

    def _register_cluster(self) -> None:
        # `sacctmgr add cluster` exits non-zero when the cluster already exists: look first.
        def ready() -> bool:
            res = self._run(
                ["sacctmgr", "-n", "-P", "show", "cluster", "format=cluster"], check=False
            )
            if res.returncode != 0:
                return False  # slurmdbd not listening yet
            if self.cluster_name not in res.stdout.split():
                self._run(["sacctmgr", "-i", "add", "cluster", self.cluster_name], check=False)
                return False
            return True

        self._wait_for("slurmdbd / sacctmgr add cluster", ready, ["slurmdbd", "mariadb"], 60)

    def node_state(self) -> str:
        res = self._run(["sinfo", "-h", "-N", "-o", "%T"], check=False, timeout=10)
        return res.stdout.strip() if res.returncode == 0 else ""

    def _wait_idle(self) -> None:
        self._wait_for(
            "slurm node idle",
            lambda: self.node_state().split() == ["idle"] * len(self.node_names),
            list(self.daemons),
            self.start_timeout,
        )

    def log_tails(self, lines: int = 15) -> str:
        parts = []
        for daemon in self.daemons:
            for path in (self.log_file(daemon), self.log_dir / f"{daemon}.out"):
                if path.exists() and path.stat().st_size:
                    parts.append(f"--- {path} ---\n{_tail(path, lines)}")
        return "\n".join(parts) or f"(no logs under {self.log_dir})"

    # ----- stop ------------------------------------------------------------------------------

    def stop(self, timeout: float = 15.0) -> None:
        """Cancel the jobs, then SIGTERM each daemon (reverse start order), wait, SIGKILL."""
        if self.alive_pids().keys() >= {"slurmctld", *self.slurmds}:
            self._cancel_jobs()
        for daemon in reversed(self.daemons):
            pid = self.pids().get(daemon)
            if pid is not None:
                self._terminate(daemon, pid, timeout)
                self.pid_file(daemon).unlink(missing_ok=True)
        self._kill_stepds()
        self._procs.clear()

    def _cancel_jobs(self) -> None:
        try:
            res = self._run(["squeue", "-h", "-o", "%i"], check=False, timeout=10)
            if res.returncode != 0 or not res.stdout.split():
                return
            self._run(["scancel", *res.stdout.split()], check=False, timeout=10)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                res = self._run(["squeue", "-h", "-o", "%i"], check=False, timeout=10)
                if res.returncode != 0 or not res.stdout.split():
                    return
                time.sleep(0.2)
        except (subprocess.TimeoutExpired, OSError):
            pass

    def _terminate(self, daemon: str, pid: int, timeout: float) -> None:
        sigs = [(signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)]
        for sig, wait in sigs:
            if not self._alive(daemon, pid):
                break
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while self._alive(daemon, pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        proc = self._procs.get(daemon)
        if proc is not None and proc.pid == pid:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)

    def _kill_stepds(self) -> None:
        """SIGKILL leftover slurmstepd processes of this cluster, and their descendants."""
        marker = f"SLURM_CONF={self.slurm_conf}".encode()
        children: dict[int, list[int]] = {}
        stepds = []
        for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[-1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
                is_stepd = (entry / "comm").read_text().strip() == "slurmstepd"
                if is_stepd and marker in (entry / "environ").read_bytes().split(b"\0"):
                    stepds.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
        todo, victims = list(stepds), []
        while todo:
            pid = todo.pop()
            victims.append(pid)
            todo.extend(children.get(pid, []))
        for pid in victims:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    # ----- context manager -------------------------------------------------------------------

    def __enter__(self) -> LocalSlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"LocalSlurmCluster(root={str(self.root)!r}, cpus={self.cpus}, "
            f"nodes={len(self.node_names)})"
        )


# ----- CLI ---------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m slurm.local_cluster",
        description="Start, stop or inspect a real single-node Slurm cluster (with accounting) "
        "whose state lives under --root. Needs root and `make slurm-deps`.",
    )
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--root", required=True, type=Path, help="directory for all its files")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs (= tasks) of each node")
    parser.add_argument("--nodes", type=int, default=1, choices=[1, 2], help="slurmd nodes")
    parser.add_argument("--cluster-name", default="mmdit-local")
    parser.add_argument("--partition", default="debug")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for idle")
    args = parser.parse_args(argv)
    cluster = LocalSlurmCluster(
        args.root,
        args.cpus,
        args.cluster_name,
        args.partition,
        start_timeout=args.timeout,
        nodes=args.nodes,
    )
    if args.command == "start":
        try:
            cluster.start()
        except SlurmClusterError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"# Slurm cluster up in {cluster.start_seconds:.1f} s; pids {cluster.alive_pids()}")
        print(f"export SLURM_CONF={cluster.slurm_conf}")
        return 0
    if args.command == "stop":
        cluster.stop()
        print(f"stopped the cluster under {cluster.root}")
        return 0
    alive, pids = cluster.alive_pids(), cluster.pids()
    for daemon in cluster.daemons:
        state = "alive" if daemon in alive else ("dead" if daemon in pids else "not started")
        print(f"{daemon:10s} {pids.get(daemon, '-')!s:>8} {state}")
    if cluster.is_running():
        print(f"node: {cluster.node_state() or 'unknown'}")
        print(f"export SLURM_CONF={cluster.slurm_conf}")
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
