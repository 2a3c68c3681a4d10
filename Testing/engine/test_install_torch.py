"""scripts/install-torch.sh (issue 10, item 8): which PyTorch build the set-up installs, and how to choose.

Run with a fake ``nvidia-smi`` (or none) and a fake ``uname`` on a PATH that holds nothing else, and a fake
Python whose pip reports what a plain ``pip install torch==2.13.0`` would pick (``2.13.0+cpu`` where pip's
configuration offers a local CPU wheel, as on the machine these tests were written on; ``2.13.0``, PyPI's
CUDA build, on a clean Linux machine) and logs every other pip call; ``MISMATCH_TORCH_DRY_RUN=1`` prints
the pip command instead of running it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "install-torch.sh"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

pytestmark = pytest.mark.skipif(sys.platform == "win32" or not shutil.which("bash"), reason="a bash script")


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def env(tmp_path):
    """``run(gpu=..., plain=..., system=..., **environment)`` -> (exit status, stdout + stderr, pip calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(shutil.which("dirname"), bin_dir / "dirname")
    log = tmp_path / "pip.log"
    python = _executable(tmp_path / "python", f"""#!{shutil.which('bash')}
if [ "$1" = -m ] && [ "$2" = pip ]; then
    if [[ " $* " == *" --dry-run "* ]]; then
        if [ -n "${{FAKE_PLAIN_VERSION:-}}" ]; then
            printf '{{"install": [{{"metadata": {{"version": "%s"}}}}]}}' "$FAKE_PLAIN_VERSION"
        fi
        exit 0
    fi
    echo "${{*:3}}" >> "{log}"
    exit 0
fi
exec "{sys.executable}" "$@"
""")

    def run(gpu: str | None = None, plain: str = "2.13.0", system: str = "Linux", dry_run: bool = True, **extra):
        for name in ("nvidia-smi", "uname"):
            (bin_dir / name).unlink(missing_ok=True)
        _executable(bin_dir / "uname", f"#!{shutil.which('bash')}\necho {system}\n")
        if gpu == "ok":
            _executable(bin_dir / "nvidia-smi", f"#!{shutil.which('bash')}\n"
                        "echo 'GPU 0: NVIDIA H200 (UUID: GPU-0123)'\n")
        elif gpu == "failing":
            _executable(bin_dir / "nvidia-smi", f"#!{shutil.which('bash')}\necho 'NVIDIA-SMI has failed because it "
                        "couldn'\\''t communicate with the NVIDIA driver.'\nexit 9\n")
        environment = {"PATH": str(bin_dir), "HOME": str(tmp_path), "FAKE_PLAIN_VERSION": plain,
                       "MISMATCH_TORCH_DRY_RUN": "1" if dry_run else "0", **extra}
        log.unlink(missing_ok=True)
        done = subprocess.run([shutil.which("bash"), str(SCRIPT), str(python)], env=environment,
                              capture_output=True, text=True, timeout=120)
        calls = log.read_text().splitlines() if log.exists() else []
        return done.returncode, done.stdout + done.stderr, calls

    return run


def _command(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.startswith("DRY RUN: ")]
    assert len(lines) == 1, output
    return lines[0].split(" -m pip install -q ", 1)[1]


def test_with_an_nvidia_gpu_the_cuda_build_from_pypi(env):
    status, out, _ = env(gpu="ok")
    assert status == 0, out
    assert _command(out) == "torch===2.13.0"          # PyPI's Linux wheel, the CUDA build, and no +cpu one
    assert "nvidia-smi lists an NVIDIA GPU" in out and "the CUDA build" in out


def test_with_a_gpu_and_a_local_cpu_wheel_pypis_cuda_build_is_still_the_one(env):
    status, out, _ = env(gpu="ok", plain="2.13.0+cpu")
    assert status == 0 and _command(out) == "torch===2.13.0"   # not the +cpu wheel pip's configuration offers


@pytest.mark.parametrize("gpu", [None, "failing"])
def test_without_a_gpu_the_cpu_build_from_pytorchs_cpu_index(env, gpu):
    status, out, _ = env(gpu=gpu)
    assert status == 0, out
    assert _command(out) == f"torch==2.13.0+cpu --index-url {CPU_INDEX}"
    assert "no NVIDIA GPU" in out and "the CPU build" in out


def test_without_a_gpu_a_cpu_wheel_that_pips_configuration_offers_is_used_as_is(env):
    """The machine these tests were written on: a local torch-2.13.0+cpu wheel and no network but PyPI."""
    status, out, _ = env(plain="2.13.0+cpu")
    assert status == 0 and _command(out) == "torch==2.13.0+cpu"   # no --index-url: no network needed
    assert "2.13.0+cpu, which pip's configuration offers" in out


def test_when_pip_cannot_say_what_it_would_install_the_cpu_index(env):
    status, out, _ = env(plain="")
    assert status == 0 and _command(out) == f"torch==2.13.0+cpu --index-url {CPU_INDEX}"


def test_mismatch_torch_chooses(env):
    status, out, _ = env(gpu="ok", MISMATCH_TORCH="cpu")
    assert status == 0 and _command(out) == f"torch==2.13.0+cpu --index-url {CPU_INDEX}"
    assert "MISMATCH_TORCH=cpu" in out
    status, out, _ = env(MISMATCH_TORCH="cuda")
    assert status == 0 and _command(out) == "torch===2.13.0" and "MISMATCH_TORCH=cuda" in out
    status, out, calls = env(gpu="ok", MISMATCH_TORCH="skip", dry_run=False)
    assert status == 0 and "DRY RUN" not in out and calls == [] and "left as it is" in out
    status, out, _ = env(MISMATCH_TORCH="rocm")
    assert status == 2 and "use cpu, cuda or skip" in out


def test_macos_has_one_build(env):
    status, out, _ = env(system="Darwin")
    assert status == 0 and _command(out) == "torch==2.13.0" and "macOS" in out
    status, out, _ = env(system="Darwin", MISMATCH_TORCH="cuda")
    assert status == 2 and "no CUDA build for macOS" in out


def test_a_real_run_calls_pip_once_and_reports_the_build_installed(env):
    pytest.importorskip("torch")
    status, out, calls = env(dry_run=False, MISMATCH_TORCH="cpu")
    assert status == 0, out
    assert calls == [f"install -q torch==2.13.0+cpu --index-url {CPU_INDEX}"]
    assert "install-torch: installed torch " in out   # this test's Python's own torch, imported after pip


def test_pyproject_license_is_an_spdx_string_with_a_setuptools_that_reads_it():
    """No 'project.license as a TOML table is deprecated' warning (twice on every install)."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert "setuptools>=77" in project["build-system"]["requires"]   # the first to read an SPDX string


def test_setup_installs_torch_through_the_script():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "scripts/install-torch.sh .venv/bin/python" in setup
    assert 'pip install -q "torch==' not in setup
    assert os.access(SCRIPT, os.X_OK)
