"""Run a worker function in N real JAX processes on 127.0.0.1 (gloo collectives), with timeouts and no leftovers.

Workers are functions of `tests/_workers.py`; each process calls one with `(out_dir,)` after
`jax.distributed.initialize` and writes what the test compares into `out_dir`.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

BOOT = """
import sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_num_cpu_devices", int(sys.argv[4]))
jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", num_processes=int(sys.argv[2]), process_id=int(sys.argv[3]),
                           initialization_timeout=60)
sys.path.insert(0, sys.argv[7])
import _workers
getattr(_workers, sys.argv[5])(sys.argv[6])
jax.distributed.shutdown()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(worker: str, out_dir: Path, *, processes: int = 2, devices_per_process: int = 4,
           timeout: float = 240) -> list[str]:
    """Start `processes` processes running `_workers.<worker>(out_dir)`; return their outputs.

    Raises `AssertionError` naming every process that exited non-zero or was still running after
    `timeout` seconds (or when a peer failed), with the end of its output; every process group is
    killed before returning or raising.
    """
    here = str(Path(__file__).parent)
    return run_processes(
        lambda port, i: [sys.executable, "-c", BOOT, str(port), str(processes), str(i), str(devices_per_process),
                         worker, str(out_dir), here],
        processes, timeout=timeout,
    )


def run_processes(command: Callable[[int, int], list[str]], processes: int, *, timeout: float) -> list[str]:
    """Run `command(port, i)` for i in range(processes), with a free port for the coordinator; as `launch`."""
    port = free_port()
    # Files, not pipes: a process that writes more than a pipe holds would block until the timeout.
    logs = [tempfile.TemporaryFile("w+") for _ in range(processes)]
    procs = [
        subprocess.Popen(command(port, i), stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        for i, log in enumerate(logs)
    ]
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                break  # a peer failed: the others would wait for it until the timeout
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for p in procs:
            p.wait()
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
            log.close()
    failures = []
    for i, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        if p.returncode != 0:
            what = "did not finish within" if p.returncode == -signal.SIGKILL else f"exited with {p.returncode} within"
            failures.append(f"process {i} of {processes} {what} {timeout:.0f} s; its output ends:\n{out[-3000:]}")
    if failures:
        raise AssertionError("\n".join(failures))
    return outputs
