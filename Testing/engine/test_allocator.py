"""The CPU allocator tuning changes where memory comes from, never the numbers."""

import subprocess
import sys
from pathlib import Path

import torch

from mismatch.allocator import tune_cpu_allocator
from mismatch.models import build_model

TRAINER = str(Path(__file__).resolve().parents[2] / "Trainer")


def _child(code: str, env_extra: dict | None = None) -> str:
    import os

    env = {k: v for k, v in os.environ.items() if k != "MISMATCH_NO_MALLOPT"}
    env.update(PYTHONPATH=TRAINER, **(env_extra or {}))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          check=True).stdout.strip()


def test_tuning_is_idempotent_and_can_be_turned_off():
    code = "from mismatch.allocator import tune_cpu_allocator as t; print(t(), t())"
    first, second = _child(code).split()
    assert first == second
    if sys.platform.startswith("linux"):
        assert _child(code, {"MISMATCH_NO_MALLOPT": "1"}) == "False False"


def test_outputs_identical_with_tuned_allocator():
    torch.manual_seed(0)
    net = build_model("mismatch", width=4).eval()
    x = torch.randn(2, 1, 40, 40)
    with torch.inference_mode():
        before = [o.clone() for o in net(x)]
        tune_cpu_allocator()
        after = net(x)
    for a, b in zip(before, after):
        assert torch.equal(a, b)
