"""cli/slurm-prunecp.sbatch launches torchrun correctly (srun and scontrol replaced by local stubs)."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "cli" / "slurm-prunecp.sbatch"


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_slurm_script_runs_a_two_process_job(tmp_path, trained_digits, digits_files):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "srun", 'while [[ "$1" == --* ]]; do shift; done; exec "$@"')  # one task, run here
    _stub(bin_dir, "scontrol", "echo 127.0.0.1")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_JOB_ID": "4242", "PRUNECP_NPROC_PER_NODE": "2", "PRUNECP_MASTER_PORT": str(_free_port()),
           "PRUNECP_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "importance.json"
    run = subprocess.run(["bash", str(SCRIPT), "score", str(trained_digits["safetensors"]), "--method", "taylor",
                          "--data", str(digits_files["score"]), "--device", "cpu", "--quiet", "-o", str(out)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "1 node(s) x 2 process(es)" in run.stderr
    assert json.loads(out.read_text())["method"] == "taylor"


def test_slurm_script_usage_without_arguments():
    run = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 2 and "usage" in run.stderr
