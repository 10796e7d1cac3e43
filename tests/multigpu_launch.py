"""Starting a 2-rank ``torchrun`` from a test: loopback only, gloo, one thread per rank, bounded in time.

A run that exceeds its time limit is killed (its whole process group) and the test fails with the ranks' output;
inside, the workers' gloo collectives time out after ``gloo_timeout`` seconds, so ranks waiting in different
collectives end with an error rather than a hang.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, cases: list[dict], tmp_path: Path, *, timeout: float = 120.0, gloo_timeout: float = 45.0,
             env: dict | None = None, nproc: int = 2, expect_failure: bool = False):
    """Run ``script CASES.json OUT_DIR`` on ``nproc`` ranks; return each rank's saved results and the seconds
    (with ``expect_failure``: the output of a run that must fail, and the seconds)."""
    import torch

    out = tmp_path / "ranks"
    out.mkdir(parents=True, exist_ok=True)
    cases_file = tmp_path / "cases.json"
    cases_file.write_text(json.dumps(cases))
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
               "MASTER_ADDR": "127.0.0.1", "STEPCACHE_TEST_GLOO_TIMEOUT": str(gloo_timeout),
               "TORCHELASTIC_ERROR_FILE": str(tmp_path / "error.json"), **(env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(HERE / script), str(cases_file),
               str(out)]
    start = time.monotonic()
    process = subprocess.Popen(command, cwd=HERE, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        log, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        log, _ = process.communicate()
        pytest.fail(f"torchrun {script} did not finish in {timeout:.0f} s (ranks hung?); output:\n{log[-6000:]}")
    seconds = time.monotonic() - start
    if expect_failure:
        if process.returncode == 0:
            pytest.fail(f"torchrun {script} was expected to fail but succeeded:\n{log[-4000:]}")
        return log, seconds
    if process.returncode != 0:
        pytest.fail(f"torchrun {script} failed (exit {process.returncode}) after {seconds:.0f} s:\n{log[-8000:]}")
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(nproc)]
    return results, seconds
