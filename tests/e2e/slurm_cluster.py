"""A real SLURM cluster on this machine for the launcher tests (facts in shared/notes/slurm-local.md).

`install()` puts Debian's munge + slurmctld + slurmd + slurm-client in place when they are missing (as root,
`apt-get update` then `apt-get install --no-install-recommends`, about 10-30 s); `SlurmCluster.start()` writes
a slurm.conf into a fresh directory, starts its own munged (own socket, pid and log files), `slurmctld -c`
and one `slurmd -N <node>` per simulated node (each its own port; node names added to /etc/hosts as
127.0.0.1), and waits until `sinfo` shows every node idle. `stop()` cancels leftover jobs and stops exactly
the daemons it started (by the pids in their pid files), removes its /etc/hosts line and its directory.

Nothing else on the machine is touched: clients find the cluster through SLURM_CONF (`cluster.env`), and
slurm.conf points Slurm at the private munge socket (AuthInfo=socket=...).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ["munge", "slurmctld", "slurmd", "slurm-client"]
BINARIES = ["munged", "slurmctld", "slurmd", "sbatch", "srun", "sinfo", "scontrol", "squeue", "scancel"]
HOSTS = Path("/etc/hosts")
HOSTS_TAG = "# hai-llm e2e slurm test"


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be installed here (not root, no apt, apt or the mirror failing); the tests skip with it."""


class ClusterError(RuntimeError):
    """SLURM is installed but the cluster did not come up: a real failure, with the daemons' logs."""


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def install(timeout_s: float = 600) -> None:
    """Install the packages when a binary is missing; raises SlurmUnavailable when that is impossible."""
    if not missing_binaries():
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"SLURM is not installed ({', '.join(missing_binaries())} missing) and installing "
                               "it needs root")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable("SLURM is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        try:
            result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as err:
            raise SlurmUnavailable(f"`{' '.join(cmd)}` did not finish in {timeout_s:.0f} s (no network to the "
                                   "Debian mirror?)") from err
        if result.returncode:
            raise SlurmUnavailable(f"`{' '.join(cmd)}` failed ({result.returncode}): "
                                   f"{(result.stderr or result.stdout).strip()[-800:]}")
    if missing_binaries():
        raise SlurmUnavailable(f"installed {PACKAGES} but still missing {missing_binaries()}")


def sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_pid_file(path: Path, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            text = path.read_text().strip()
            if text:
                return int(text)
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.05)
    raise ClusterError(f"{path} did not appear within {timeout_s:.0f} s")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except OSError:
        return False


def stop_pid(pid: int, timeout_s: float = 10) -> None:
    """SIGTERM, then SIGKILL after `timeout_s`; returns once the process is gone."""
    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not alive(pid):
                return
            time.sleep(0.05)


@dataclass
class Job:
    """A finished batch job: its id, `sbatch --wait`'s exit code, its state and its output file's text."""

    job_id: int
    returncode: int
    state: str
    output: str
    seconds: float


@dataclass
class SlurmCluster:
    """A running single-machine cluster of `len(nodes)` simulated nodes (one partition `debug`)."""

    root: Path
    nodes: list[str]
    cpus_per_node: int = 8
    pids: dict[str, int] = field(default_factory=dict)
    hosts_line: str | None = None

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """This process's environment without stale SLURM_* variables, pointed at the cluster."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        return {**base, "SLURM_CONF": str(self.conf)}

    @classmethod
    def start(cls, n_nodes: int = 2, timeout_s: float = 60) -> SlurmCluster:
        """Install when needed, configure and start the daemons; on any failure stop what was started."""
        if os.geteuid() != 0:
            raise SlurmUnavailable("a local SLURM cluster needs root (SlurmUser=root, munged as munge)")
        install()
        root = Path(tempfile.mkdtemp(prefix="hai-slurm-"))
        root.chmod(0o755)  # munged (user munge) must reach its directory inside
        cluster = cls(root=root, nodes=[f"hai-n{i + 1}" for i in range(n_nodes)])
        try:
            cluster._configure()
            cluster._start_daemons(timeout_s)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _configure(self) -> None:
        munge_dir = self.root / "munge"
        munge_dir.mkdir(mode=0o755)
        shutil.chown(munge_dir, "munge", "munge")
        for d in ("state", "spool"):
            (self.root / d).mkdir()
        host = socket.gethostname().split(".")[0]  # slurmctld insists on `hostname -s`
        r = self.root
        lines = [
            "ClusterName=haitest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={munge_dir / 'munge.socket'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerParameters=batch_sched_delay=0",
            "SlurmdParameters=config_overrides",
            "MpiDefault=none",
            "ReturnToService=2",
            "KillWait=5",
            "MinJobAge=16",  # sbatch --wait then polls every 8 s (not 32); jobs stay visible 16 s after the end
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r / 'slurmctld.log'}",
            f"SlurmdLogFile={r}/slurmd-%n.log",
        ]
        for node in self.nodes:
            lines.append(f"NodeName={node} NodeHostname={node} NodeAddr=127.0.0.1 Port={free_port()} "
                         f"CPUs={self.cpus_per_node} State=UNKNOWN")
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        self._add_hosts()

    def _add_hosts(self) -> None:
        """The node names resolve to 127.0.0.1 (MASTER_ADDR is the first node's name)."""
        unresolved = []
        for node in self.nodes:
            try:
                socket.gethostbyname(node)
            except OSError:
                unresolved.append(node)
        if unresolved:
            self.hosts_line = f"127.0.0.1 {' '.join(unresolved)} {HOSTS_TAG} {os.getpid()}"
            with HOSTS.open("a") as f:
                f.write(self.hosts_line + "\n")

    def _start_daemons(self, timeout_s: float) -> None:
        m = self.root / "munge"
        subprocess.run([sbin("munged"), f"--socket={m / 'munge.socket'}", f"--pid-file={m / 'munged.pid'}",
                        f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'munged.seed'}"],
                       user="munge", group="munge", check=True, capture_output=True, timeout=timeout_s)
        self.pids["munged"] = wait_pid_file(m / "munged.pid", timeout_s)
        self._daemon("slurmctld", [sbin("slurmctld"), "-c"], self.root / "slurmctld.pid", timeout_s)
        for node in self.nodes:
            self._daemon(f"slurmd {node}", [sbin("slurmd"), "-N", node], self.root / f"slurmd-{node}.pid", timeout_s)
        self._wait_idle(timeout_s)

    def _daemon(self, name: str, cmd: list[str], pid_file: Path, timeout_s: float) -> None:
        result = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout_s)
        if result.returncode:
            raise ClusterError(f"{name} did not start ({result.returncode}): {result.stderr.strip()[-800:]}")
        self.pids[name] = wait_pid_file(pid_file, timeout_s)

    def _wait_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        states = ""
        while time.monotonic() < deadline:
            result = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
            states = result.stdout.strip()
            found = dict(line.split() for line in states.splitlines() if len(line.split()) == 2)
            if found and all(found.get(n) == "idle" for n in self.nodes):
                return
            time.sleep(0.2)
        raise ClusterError(f"nodes not idle after {timeout_s:.0f} s: {states!r}\n{self.logs()}")

    def run(self, cmd: list[str], check: bool = True, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster."""
        return subprocess.run(cmd, env=kwargs.pop("env", self.env), capture_output=True, text=True, check=check,
                              timeout=timeout, **kwargs)

    def sbatch(self, script: Path, args: list[str], options: list[str], output: Path, cwd: Path,
               env: dict[str, str] | None = None, timeout: float = 120) -> Job:
        """`sbatch --wait` a script; returns once the job ended (or cancels it and raises on timeout)."""
        t0 = time.monotonic()
        cmd = ["sbatch", "--wait", f"--output={output}", *options, str(script), *args]
        proc = subprocess.Popen(cmd, cwd=cwd, env={**self.env, **(env or {})}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            self.run(["scancel", "--user=root"], check=False)
            raise AssertionError(f"job did not end within {timeout} s: {stdout}{stderr}\n{self.logs()}") from None
        seconds = time.monotonic() - t0
        match = re.search(r"Submitted batch job (\d+)", stdout)
        assert match, f"sbatch failed ({proc.returncode}): {stdout}{stderr}"
        job_id = int(match.group(1))
        show = self.run(["scontrol", "show", "job", str(job_id)], check=False).stdout
        state = re.search(r"JobState=(\S+)", show)
        text = output.read_text() if output.exists() else ""
        return Job(job_id, proc.returncode, state.group(1) if state else "UNKNOWN", text, seconds)

    def logs(self) -> str:
        """The tails of the daemons' logs (for failure messages)."""
        parts = []
        for log in sorted([*self.root.glob("*.log"), *self.root.glob("munge/*.log")]):
            parts.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:]))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel leftover jobs, stop exactly the daemons started here, undo /etc/hosts, remove the directory."""
        try:
            if "slurmctld" in self.pids and alive(self.pids["slurmctld"]):
                self.run(["scancel", "--user=root"], check=False, timeout=20)
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    queue = self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=20)
                    if queue.returncode or not queue.stdout.strip():
                        break
                    time.sleep(0.2)
        except (OSError, subprocess.SubprocessError):
            pass
        finally:
            order = [n for n in self.pids if n.startswith("slurmd")] + ["slurmctld", "munged"]
            for name in order:
                if name in self.pids:
                    stop_pid(self.pids.pop(name))
            self._remove_hosts()
            shutil.rmtree(self.root, ignore_errors=True)

    def _remove_hosts(self) -> None:
        if self.hosts_line is None:
            return
        lines = HOSTS.read_text().splitlines(keepends=True)
        HOSTS.write_text("".join(line for line in lines if line.rstrip("\n") != self.hosts_line))
        self.hosts_line = None
