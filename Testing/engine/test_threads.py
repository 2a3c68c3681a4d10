"""CPU threads and the OpenMP wait policy: chosen before torch starts its thread pool, the user's own
``OMP_NUM_THREADS`` respected, ``--threads`` above both, passive waiting unless the user says otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mismatch.cli import choose_threads, configure_threads, main, physical_cores

TRAINER = str(Path(__file__).resolve().parents[2] / "Trainer")

PROBE = """
import os, sys
assert "torch" not in sys.modules, "importing the command line imported torch"
from mismatch import cli
assert "torch" not in sys.modules, "importing the command line imported torch"

def probe(args):
    import torch
    print(torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS"), os.environ.get("OMP_WAIT_POLICY"))
    return 0

cli.COMMANDS["evaluate"] = probe
sys.exit(cli.main(sys.argv[1:]))
"""


def _probe(*argv, **env_changes) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "KMP_BLOCKTIME")}
    env.update(PYTHONPATH=TRAINER, **env_changes)
    done = subprocess.run([sys.executable, "-c", PROBE, "evaluate", "--prediction", "p.nrrd", "--truth", "t.nrrd",
                           *argv], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    threads, omp, policy = done.stdout.split()
    return int(threads), omp, policy


def test_the_default_is_the_physical_cores_with_passive_waiting_set_before_torch_loads():
    threads, omp, policy = _probe()
    assert threads == physical_cores() and omp == str(threads) and policy == "PASSIVE"


def test_the_users_omp_num_threads_and_wait_policy_are_kept_and_threads_overrides():
    assert _probe(OMP_NUM_THREADS="1") == (1, "1", "PASSIVE")
    assert _probe(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="ACTIVE") == (1, "1", "ACTIVE")
    assert _probe("--threads", "3", OMP_NUM_THREADS="1") == (3, "3", "PASSIVE")


def test_the_entry_points_import_no_torch_before_main():
    """``mismatch`` (console script: mismatch.cli:main) and ``python -m mismatch`` (mismatch/__main__.py,
    which imports mismatch.cli) reach :func:`main` with torch not yet imported."""
    main_py = (Path(TRAINER) / "mismatch" / "__main__.py").read_text()
    assert "import torch" not in main_py and "from .cli import main" in main_py
    done = subprocess.run([sys.executable, "-c", "import sys, mismatch, mismatch.cli; print('torch' in sys.modules)"],
                          env=dict(os.environ, PYTHONPATH=TRAINER), capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


def _fake_sysfs(root: Path, cores: list[tuple[int, int]]) -> str:
    """One ``cpu<N>/topology`` per logical CPU: ``(package, core)``."""
    for n, (package, core) in enumerate(cores):
        topology = root / f"cpu{n}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{package}\n")
        (topology / "core_id").write_text(f"{core}\n")
    return str(root)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sysfs topology")
def test_hyper_threads_of_one_core_count_once(tmp_path, monkeypatch):
    import mismatch.cli

    monkeypatch.setattr(mismatch.cli, "_cgroup_cpu_limit", lambda: None)
    sysfs = _fake_sysfs(tmp_path, [(0, 0), (0, 1), (0, 0), (0, 1), (1, 0), (1, 1), (1, 0), (1, 1)])
    assert physical_cores(list(range(8)), sysfs) == 4          # two sockets of two cores, two threads each
    assert physical_cores([0, 2], sysfs) == 1                  # the affinity mask: two threads of one core
    assert physical_cores([0, 1, 4], sysfs) == 3
    monkeypatch.setattr(mismatch.cli, "_cgroup_cpu_limit", lambda: 2.5)   # a container's CPU quota
    assert physical_cores(list(range(8)), sysfs) == 2


def test_choice_order():
    assert choose_threads(3, {"OMP_NUM_THREADS": "1"}) == (3, "--threads")
    assert choose_threads(None, {"OMP_NUM_THREADS": "2"}) == (2, "OMP_NUM_THREADS")
    assert choose_threads(None, {"OMP_NUM_THREADS": "junk"}) == (physical_cores(), "physical cores")
    env: dict = {}
    assert configure_threads(None, env)[0] == physical_cores()
    if "torch" in sys.modules:   # here: too late to set the environment, which is left alone
        assert env == {}


def test_in_process_callers_get_their_thread_count_back(tmp_path, capsys):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["evaluate", "--prediction", str(tmp_path / "p.nrrd"), "--truth", str(tmp_path / "t.nrrd"),
                     "--threads", "1"]) == 2   # a missing file; the threads were set and are restored
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("setting,policy", [("before", "(OpenMP default)"), ("after", "PASSIVE")])
def test_the_thread_benchmark_worker_runs(tmp_path, setting, policy):
    """A smoke run of measurements/bench_threads.py's per-run worker (one tiny step; nothing is measured)."""
    script = Path(TRAINER).parent / "measurements" / "bench_threads.py"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "KMP_BLOCKTIME")}
    out = tmp_path / "r.json"
    done = subprocess.run([sys.executable, str(script), "--worker", str(out), "--setting", setting, "--steps", "1",
                           "--warmup", "0", "--width", "4", "--patch-size", "32"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    import json

    result = json.loads(out.read_text())
    assert result["steps"] == 1 and result["median_s"] > 0 and result["omp_wait_policy"] == policy
    if setting == "after":
        assert result["threads"] == physical_cores()
