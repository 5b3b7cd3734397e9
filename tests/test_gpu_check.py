"""tools/gpu_check.py: its help, the no-GPU exit, a dry run of its checks on the CPU, and a
failing check that fails the run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.py"


def run(*args: str, gpu: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # as a machine without a GPU
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True,
                          timeout=240, env=env)


def test_help_lists_every_check():
    out = run("--help")
    assert out.returncode == 0
    for check in ("select", "channel", "mapped", "merge", "composer", "pin"):
        assert check in out.stdout


def test_without_a_gpu_it_says_so_and_exits_0():
    out = run()
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("no CUDA GPU: nothing to check (--device cpu runs the checks' "
                                  "code on the CPU)")


def test_dry_run_on_the_cpu_runs_each_check_and_prints_the_table():
    # merge and composer start processes (tested in test_distributed / test_composer)
    out = run("--device", "cpu", "--quick", "--only", "select,channel,mapped,pin")
    assert out.returncode == 0, out.stdout + out.stderr
    rows = out.stdout.strip().splitlines()
    assert rows[0].split()[:3] == ["status", "check", "claim"]
    assert [r.split()[:2] for r in rows[1:]] == [["DRY", "select"], ["DRY", "channel"],
                                                 ["DRY", "mapped"], ["DRY", "pin"]]
    assert "same picks: True" in rows[2]  # the channel chose what the in-memory store chose


def test_a_failing_check_is_a_fail_row_and_exit_1():
    out = run("--device", "cpu", "--quick", "--only", "mapped,select", "--store-n", "0")
    assert out.returncode == 1
    rows = out.stdout.strip().splitlines()[1:]
    assert rows[0].startswith("FAIL") and "num_samples" in rows[0]  # the store refuses n = 0
    assert rows[1].startswith("DRY")  # the other checks still ran


def test_an_unknown_check_is_refused_by_name():
    out = run("--only", "select,warp")
    assert out.returncode == 2 and "warp" in out.stderr
