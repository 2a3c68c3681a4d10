"""Training on several processes (torchrun, DistributedDataParallel, gloo on the CPU): two processes train
like one with the same global batch, only rank 0 writes, SIGTERM and SIGKILL leave a resumable run.

The multi-process tests start ``python -m torch.distributed.run --standalone --nproc_per_node 2`` as a
child process, the way a user does; the gradient test runs this file itself as the ranks' script. Tiny
settings (width 4, 16 x 16 patches, 3 steps) keep the file to a few launches of a few seconds each.

The equality tests train MisMatch without its default augmentation (``--method-option augment=false``), so the
two-process and one-process runs see the same inputs; random augmentation is drawn per process, reproducible
but not equal to a one-process run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file, save_file

from mismatch import distributed
from mismatch.cli import main
from mismatch.data import TwoStreamSampler, common_size
from mismatch.errors import UserError
from mismatch.methods import TrainingBatch, make_method
from mismatch.modelfile import load_checkpoint, load_model
from mismatch.models import ArchitectureConfig, SegmentationNetwork
from mismatch.train import StopRequest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- helpers ---------------------------------------------------------------------------------------------

def _arrays(num_classes: int = 2):
    """A 10-slice image with a disc (two classes: an inner ring as class 2), labels on slices 2 and 6, and an
    unlabelled volume of another size."""
    rng = np.random.default_rng(0)
    k, j, i = 10, 32, 40
    zz, yy, xx = np.mgrid[:k, :j, :i]
    r2 = (yy - 16) ** 2 + (xx - 20) ** 2
    disc = r2 < (6 + zz * 0.3) ** 2
    image = (np.where(disc, 1.0, -1.0) + rng.normal(0, 0.3, (k, j, i))).astype(np.float32)[None]
    labels = np.zeros((k, j, i), np.uint8)
    labels[[2, 6]] = disc[[2, 6]]
    if num_classes == 3:
        labels[[2, 6]] += (r2 < 9)[[2, 6]].astype(np.uint8)
    extra = rng.normal(0, 1, (1, 6, 24, 44)).astype(np.float32)
    return image, labels, extra


def _gradients(patch: int, num_classes: int) -> tuple[dict[str, torch.Tensor], float]:
    """One MisMatch step's gradients on a global batch of 4 labelled + 4 unlabelled slices (this process's
    share of it under torchrun), and the global batch's loss."""
    ctx = distributed.current()
    image, labels, extra = _arrays(num_classes)
    torch.manual_seed(0)
    net = SegmentationNetwork(ArchitectureConfig(width=4, num_classes=num_classes))
    model = ctx.wrap(net)
    sampler = TwoStreamSampler([image, extra], labels, [2, 6], patch_size=patch, seed=1, shard=ctx.shard)
    method = make_method("mismatch", alpha=1.0, alpha_rampup=0)   # a consistency weight that matters
    xl, yl = sampler.labelled_batch(4)
    xu = sampler.unlabelled_batch(4)
    xl, yl, xu = common_size(xl, yl, xu)
    batch = TrainingBatch(torch.from_numpy(xl), torch.from_numpy(yl), torch.from_numpy(xu), step=0, total_steps=3,
                          batch_sum=ctx.batch_sum)
    loss, _ = method.loss(model, batch)
    loss.backward()
    mean_loss, _ = ctx.mean_losses(float(loss.detach()), {})
    return {name: p.grad.detach().clone() for name, p in net.named_parameters()}, mean_loss


CONFIGS = [(16, 2), (0, 3)]   # (patch size: 0 = whole slices padded to the global batch's size, classes)


def _rank_script(out: str, train_argv: list[str]) -> int:
    """One rank of :func:`test_two_processes_match_one_process`, started by torchrun: one step's gradients
    for each of :data:`CONFIGS` (rank 0 saves the DDP-averaged ones to ``out``), then ``mismatch train``
    with ``train_argv`` through the command line's own entry point."""
    torch.set_num_threads(1)
    ctx = distributed.init_from_env("cpu")
    tensors = {}
    for n, (patch, classes) in enumerate(CONFIGS):
        grads, loss = _gradients(patch, classes)
        tensors.update({f"{n}.{k}": v for k, v in grads.items()})
        tensors[f"{n}.loss"] = torch.tensor([loss], dtype=torch.float64)
    if ctx.is_main:
        save_file(tensors, out)
    return main(train_argv)   # joins the same process group; leaves it when done


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT / "Trainer"), OMP_NUM_THREADS="1")


def _torchrun(args: list[str], **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _events(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _write(array, path):
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return str(path)


@pytest.fixture
def case(tmp_path):
    """Image and labels files, and a manifest of two unlabelled volumes of other sizes and formats."""
    image, labels, _ = _arrays()
    rng = np.random.default_rng(5)
    _write((rng.normal(-300, 200, (7, 24, 20))).astype(np.int16), tmp_path / "u0.nrrd")
    _write((rng.normal(-300, 200, (12, 40, 36))).astype(np.float32), tmp_path / "u1.nii.gz")
    (tmp_path / "pool.csv").write_text("path\nu0.nrrd\nu1.nii.gz\n")
    return {"image": _write(image[0] * 400.0, tmp_path / "image.nrrd"),
            "labels": _write(labels, tmp_path / "labels.nrrd"),
            "manifest": str(tmp_path / "pool.csv"), "dir": tmp_path}


TINY = ["--width", "4", "--patch-size", "16", "--batch-size", "4", "--unlabelled-batch-size", "4",
        "--device", "cpu", "--seed", "3", "--method-option", "augment=false"]


def _train_args(case, out, steps, *extra):
    return ["train", case["image"], "--labels", case["labels"], "--out", str(out), "--steps", str(steps),
            "--unlabelled-manifest", case["manifest"], *TINY, *extra]


# -- one process: nothing distributed --------------------------------------------------------------------

def test_sampler_shards_are_the_one_process_batch():
    image, labels, extra = _arrays()
    for patch in (16, 0):
        one = TwoStreamSampler([image, extra], labels, [2, 6], patch_size=patch, seed=4)
        ranks = [TwoStreamSampler([image, extra], labels, [2, 6], patch_size=patch, seed=4, shard=(r, 2))
                 for r in range(2)]
        for _ in range(5):
            xl, yl = one.labelled_batch(4)
            xu = one.unlabelled_batch(6)
            parts = [(s.labelled_batch(4), s.unlabelled_batch(6)) for s in ranks]
            assert all(p[0][0].shape[0] == 2 and p[1].shape[0] == 3 for p in parts)  # both streams split evenly
            np.testing.assert_array_equal(np.concatenate([p[0][0] for p in parts]), xl)
            np.testing.assert_array_equal(np.concatenate([p[0][1] for p in parts]), yl)
            np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), xu)
        assert ranks[0].state_dict() == ranks[1].state_dict() == one.state_dict()
    with pytest.raises(UserError, match="multiple of 2"):
        ranks[0].labelled_batch(3)


def test_the_batch_plan_is_the_same_on_every_rank_and_reads_no_image():
    """A plan depends on slice shapes, labels and the seed only: ranks, and samplers over other image values,
    draw the same slices and crop origins; materialising a share reads only that share's slices."""
    image, labels, extra = _arrays()
    for patch in (16, 0):
        samplers = [TwoStreamSampler([image, extra], labels, [2, 6], patch_size=patch, seed=4, shard=(r, 2))
                    for r in range(2)]
        samplers.append(TwoStreamSampler([np.zeros_like(image), np.ones_like(extra)], labels, [2, 6],
                                         patch_size=patch, seed=4))
        for _ in range(4):
            plans = [(s.plan_labelled(4), s.plan_unlabelled(6)) for s in samplers]
            assert all(p == plans[0] for p in plans)
            assert [len(p.crops) for p in plans[0]] == [4, 6]
            assert all(c.h <= (patch or c.h) and c.w <= (patch or c.w) for p in plans[0] for c in p.crops)
        x = samplers[1].materialise(plans[0][1])
        assert x.shape[0] == 3 and x.shape[-2:] == plans[0][1].size
        for b, c in enumerate(plans[0][1].crops[3:]):   # rank 1's share: the second half of the plan
            slice_ = [image, extra][c.volume][:, c.slice]
            crop = slice_[:, c.y0:c.y0 + c.h, c.x0:c.x0 + c.w]
            if crop.shape[-2:] == x.shape[-2:]:
                np.testing.assert_array_equal(x[b], crop)


def test_a_plain_run_never_starts_torch_distributed(monkeypatch):
    for value in (None, "1"):
        if value is None:
            monkeypatch.delenv("WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("WORLD_SIZE", value)
        ctx = distributed.init_from_env("cpu")
        assert not ctx.distributed and ctx.is_main and ctx.shard is None
        assert not torch.distributed.is_initialized()
        asked = StopRequest()
        asked.request("SIGTERM")
        assert ctx.agree_stop(asked) and not ctx.agree_stop(StopRequest())
        assert ctx.batch_sum is None
        assert ctx.mean_losses(0.5, {"dice": 0.2}) == (0.5, {"dice": 0.2})
        ctx.check_batch(3, "--batch-size")
        ctx.close()


def test_batch_and_device_rules():
    ctx = distributed.Context(rank=1, world_size=2)
    with pytest.raises(UserError, match="multiple of 2"):
        ctx.check_batch(3, "--batch-size")
    ctx.check_batch(4, "--batch-size")
    assert distributed.rank_device("cpu", 1) == torch.device("cpu")
    for name, match in (("cuda:1", "LOCAL_RANK"), ("mps", "CPU"), ("tpu", "unknown")):
        with pytest.raises(UserError, match=match):
            distributed.rank_device(name, 0)


def test_an_uneven_batch_is_refused_before_anything_is_written(case, monkeypatch):
    from mismatch.api import train_files
    from mismatch.train import TrainConfig

    monkeypatch.setattr(distributed, "_CURRENT", distributed.Context(rank=0, world_size=2))
    for sizes, option in (((3, 0), "--batch-size 3"), ((4, 3), "--unlabelled-batch-size 3")):
        config = TrainConfig(steps=1, width=4, patch_size=16, batch_size=sizes[0], unlabelled_batch_size=sizes[1])
        with pytest.raises(UserError, match=f"{option} is the global batch, split evenly over the 2 processes"):
            train_files([case["image"]], case["labels"], str(case["dir"] / "model"), config, device="cpu")
        assert not (case["dir"] / "model").exists()


# -- two processes ---------------------------------------------------------------------------------------

def test_two_processes_match_one_process(case):
    """The same global batch on two processes (gloo) and on one: equal gradients, losses and weights; only
    rank 0 writes the model folder and the events."""
    d = case["dir"]
    out = d / "grads.safetensors"
    proc = _torchrun([__file__, str(out), *_train_args(case, d / "two", 3, "--events", str(d / "two.jsonl"))])

    # meanwhile, one process: the same gradients and the same training
    one = [_gradients(patch, classes) for patch, classes in CONFIGS]
    assert main(_train_args(case, d / "one", 3, "--events", str(d / "one.jsonl"))) == 0
    assert not torch.distributed.is_initialized()
    stdout, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]

    # 1. DDP's averaged gradient on two halves of the global batch is one process's gradient on all of it
    #    (the Dice sums are all-reduced, per-sample terms average, GroupNorm is per sample)
    two = load_file(str(out))
    for n, (grads, loss) in enumerate(one):
        assert abs(float(two[f"{n}.loss"]) - loss) < 1e-5 * max(1.0, abs(loss))
        scale = max(float(g.abs().max()) for g in grads.values())
        compared = 0
        for name, g1 in grads.items():
            g2 = two[f"{n}.{name}"]
            if float(g1.abs().max()) < 1e-6 * scale:
                # a bias followed by GroupNorm: zero in exact arithmetic, float noise in both runs
                assert float(g2.abs().max()) < 1e-6 * scale, name
                continue
            torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-5 * float(g1.abs().max()), msg=name)
            compared += 1
        assert compared > len(grads) // 2

    # 2. only rank 0 wrote: one model folder, one event stream, one final line
    assert stdout.count("model written to") == 1
    assert sorted(p.name for p in (d / "two").iterdir()) == ["model.json", "model.safetensors",
                                                              "optimizer.safetensors", "painted.safetensors"]
    events = _events(d / "two.jsonl")
    assert [e["event"] for e in events].count("end") == 1 and events[-1]["status"] == "completed"
    assert [e.get("phase") for e in events if e["event"] == "start"] == ["load", "train"]

    # 3. the same training: every step's loss (the global batch's, averaged over the processes), the weights
    losses = {n: [e["loss"] for e in _events(d / f"{n}.jsonl") if e["event"] == "progress"] for n in ("one", "two")}
    assert len(losses["two"]) == 3
    np.testing.assert_allclose(losses["two"], losses["one"], rtol=2e-5, atol=2e-6)
    card, nets = load_model(d / "two")
    assert card["training"]["processes"] == 2 and card["training"]["unlabelled_cases"] == 2
    a = load_file(str(d / "one" / "model.safetensors"))
    b = load_file(str(d / "two" / "model.safetensors"))
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k] - b[k]).abs().ravel() for k in a])
    # AdamW divides each gradient by its own running magnitude, so float rounding in a gradient that is
    # essentially zero (e.g. a convolution bias that GroupNorm cancels) moves that weight by up to ~lr; every
    # other weight agrees to float precision. How many gradients are that close to zero depends on the CPU's
    # kernels: under 2 % of the weights on the AVX-512 hosts, 7.3 % on an AVX2-only AMD EPYC (the same engine)
    assert float(diff.median()) < 1e-6 and float((diff > 1e-5).float().mean()) < 0.12, float(diff.max())


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _wait_for(predicate, proc, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.communicate()[1][-3000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_sigterm_to_torchrun_stops_every_rank_with_one_checkpoint(case):
    d = case["dir"]
    events = d / "events.jsonl"
    proc = _torchrun(["-m", "mismatch", *_train_args(case, d / "model", 2000, "--events", str(events))])
    _wait_for(lambda: events.exists() and '"progress"' in events.read_text(), proc)
    proc.send_signal(signal.SIGTERM)   # torchrun forwards it to both ranks
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0   # torchrun reports the signal as a failure of its own
    ends = [e for e in _events(events) if e["event"] == "end"]
    assert len(ends) == 1 and ends[0]["status"] == "cancelled" and "--resume" in ends[0]["message"], ends
    assert err.count("mismatch train: cancelled") == 1, err[-3000:]
    assert sorted(p.name for p in (d / "model").iterdir()) == ["checkpoint"]
    assert sorted(p.name for p in (d / "model" / "checkpoint").iterdir()) == ["state.json", "state.safetensors"]
    state = json.loads((d / "model" / "checkpoint" / "state.json").read_text())
    assert 0 < state["step"] < 2000
    assert re.search(rf"stopped by SIGTERM at step {state['step']} of 2000", ends[0]["message"])


def test_resume_after_a_killed_two_process_run(case):
    d = case["dir"]
    events = d / "events.jsonl"
    args = _train_args(case, d / "model", 40, "--checkpoint-every", "4", "--events", str(events))
    proc = _torchrun(["-m", "mismatch", *args])
    state_file = d / "model" / "checkpoint" / "state.json"
    _wait_for(state_file.exists, proc)
    ranks = _children(proc.pid)   # torchrun starts each rank in a session of its own
    assert len(ranks) == 2
    for pid in ranks + [proc.pid]:   # the ranks and the launcher, no chance to clean up
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    for pid in ranks:
        _wait_for(lambda pid=pid: not Path(f"/proc/{pid}").exists() or _zombie(pid), None, timeout=30)
    step = load_checkpoint(d / "model" / "checkpoint")[1]["step"]   # also after a kill between its renames
    assert 0 < step < 40 and not (d / "model" / "model.json").exists()

    proc = _torchrun(["-m", "mismatch", *args, "--resume"])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    log = [e["message"] for e in _events(events) if e["event"] == "log"]
    assert any(re.match(r"resuming at step \d+ of 40", m) for m in log), log
    card, nets = load_model(d / "model")   # checks the weights' checksum and architecture
    assert card["summary"]["steps"] == 40 and card["summary"]["loss_curve"][-1]["step"] == 40
    assert not (d / "model" / "checkpoint").exists()
    x = torch.zeros(1, 1, 32, 40)
    assert all(torch.isfinite(o).all() for o in nets[0](x))


if __name__ == "__main__":   # a rank of test_two_processes_match_one_process, started by torchrun
    sys.exit(_rank_script(sys.argv[1], sys.argv[2:]))
