"""Several JAX processes of one command on this machine, as a multi-host run would start them.

``python -m advalign_jax.launch N COMMAND...`` (``scripts/launch_local.sh N COMMAND...``) picks a free
port on 127.0.0.1 for the coordinator and starts N copies of COMMAND with ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` and ``JAX_PLATFORMS=cpu`` (gloo collectives) set, and
``--config.distributed=true`` added (``--distributed`` for commands without a config). Each process's
output lines are prefixed with ``[ID]``. When one process fails, the others are stopped (SIGTERM, then
SIGKILL after ``--grace`` seconds) and the launcher exits with the first non-zero exit code (128 + N
for a process killed by signal N, as a shell reports it), after one line saying which process failed.

The same code paths run on a TPU pod or a GPU cluster: process-local data, global arrays assembled
from process-local pieces, collectives across processes, multi-process checkpoints, one writer.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Optional, Sequence


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_distributed_flag(command: Sequence[str]) -> list[str]:
    """COMMAND with ``--config.distributed=true`` (config-driven commands) or ``--distributed``."""
    command = list(command)
    if any(a == "--config" or a.startswith("--config=") or a.startswith("--config.") for a in command):
        return command + ["--config.distributed=true"]
    return command + ["--distributed"]


def _pump(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"{prefix}{line}")
        out.flush()
    stream.close()


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def launch(n: int, command: Sequence[str], grace: float = 10.0, env: Optional[dict] = None) -> int:
    """Runs ``command`` as ``n`` processes; returns 0 or the first non-zero exit code."""
    if n < 1:
        print(f"launch_local: the number of processes must be at least 1, got {n}", file=sys.stderr)
        return 2
    base = dict(os.environ if env is None else env)
    base.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}", JAX_NUM_PROCESSES=str(n),
                JAX_PLATFORMS=base.get("JAX_PLATFORMS") or "cpu", PYTHONUNBUFFERED="1")
    base.setdefault("ADVALIGN_JAX_HEARTBEAT_TIMEOUT_S", "20")
    full = with_distributed_flag(command)
    procs, pumps = [], []
    for i in range(n):
        proc = subprocess.Popen(full, env={**base, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        procs.append(proc)
        for stream, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
            t = threading.Thread(target=_pump, args=(stream, f"[{i}] ", out), daemon=True)
            t.start()
            pumps.append(t)
    failed: Optional[tuple[int, int]] = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if bad and failed is None:
                failed = bad[0]
                _stop([p for p in procs if p.poll() is None], grace)
            if all(c is not None for c in (p.poll() for p in procs)):
                break
            time.sleep(0.05)
    except KeyboardInterrupt:
        _stop([p for p in procs if p.poll() is None], grace)
        failed = failed or (-1, -signal.SIGINT)
    for t in pumps:
        t.join(timeout=5)
    if failed is None:
        return 0
    i, code = failed
    how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
    who = f"process {i}" if i >= 0 else "the launch"
    print(f"launch_local: {who} {how}; the other processes were stopped (rerun the same command to resume)",
          file=sys.stderr)
    return _exit_code(code)


def _stop(procs, grace: float) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="launch_local", description="Run COMMAND as N JAX processes on this machine (a local multi-host run).",
        epilog="Example: scripts/launch_local.sh 2 advalign-jax evaluate --config "
               "configs/adversarial_alignment.py:runlocal --config.workdir=results/two")
    parser.add_argument("n", type=int, help="number of processes")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    args = parser.parse_args(argv)
    if not args.command:
        parser.error("give the command to run")
    return launch(args.n, args.command, grace=args.grace)


if __name__ == "__main__":
    sys.exit(main())
