"""The paper's semi-supervised baselines (Mean Teacher, FixMatch, CCT, MTA, Morph) as methods on the shared
backbone and training loop: their losses, gradients, heads, and that every registered method trains and
segments through the command line. Width 4, 32x32 slices, CPU."""

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from discs import disc_volume
from mismatch.cli import main
from mismatch.methods import METHODS, TrainingBatch, make_method
from mismatch.methods.augment import rand_augment
from mismatch.methods.fixmatch import masked_pseudo_label_loss, pseudo_labels
from mismatch.models.blocks import DecoderBlock
from mismatch.models.heads import MorphologicalDecoderBlock, grey_dilate, grey_erode, vat_perturbation
from mismatch.models.networks import ArchitectureConfig, SegmentationNetwork, build_model

BASELINES = ["mt", "fixmatch", "cct", "mta", "morph"]
ORIGINAL = ["mismatch", "unet", "sup2", "mm-a", "mm-b", "mm-c"]


def _net(method, num_classes=2, in_channels=1):
    torch.manual_seed(0)
    return SegmentationNetwork(ArchitectureConfig(name=method.architecture, in_channels=in_channels,
                                                  num_classes=num_classes, width=4))


def _batch(num_classes=2, step=5, total=10, unlabelled=True, in_channels=1):
    g = torch.Generator().manual_seed(1)
    y = torch.zeros(2, 32, 32, dtype=torch.long)
    y[:, 8:20, 10:24] = 1
    if num_classes > 2:
        y[:, 22:28, 4:12] = 2
    x = torch.randn(2, in_channels, 32, 32, generator=g) * 0.3 + y[:, None].float()
    xu = torch.randn(3, in_channels, 32, 32, generator=g) if unlabelled else None
    return TrainingBatch(labelled_x=x, labelled_y=y, unlabelled_x=xu, step=step, total_steps=total)


def _grad_norm(module):
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_the_baselines_are_registered_and_the_original_names_unchanged():
    assert set(BASELINES + ORIGINAL) <= set(METHODS)
    archs = {n: make_method(n).architecture for n in BASELINES + ORIGINAL}
    assert archs == {"mt": "unet", "fixmatch": "unet", "cct": "cct", "mta": "mta", "morph": "morph",
                     "mismatch": "mismatch", "unet": "unet", "sup2": "mismatch", "mm-a": "mm-a",
                     "mm-b": "mm-b", "mm-c": "mm-c"}
    assert all(make_method(n).uses_unlabelled for n in BASELINES)


@pytest.mark.parametrize("name", ORIGINAL[:2] + ["mm-a"])
def test_existing_architectures_keep_their_weights_and_card(name):
    net = build_model(make_method(name).architecture, width=4)
    keys = list(net.state_dict())
    assert keys and all(k.startswith(("encoder.", "decoders.")) for k in keys)
    assert "auxiliary_heads" not in net.config.to_dict()


@pytest.mark.parametrize("num_classes", [2, 3])
@pytest.mark.parametrize("name", BASELINES)
def test_loss_is_finite_and_reaches_the_encoder(name, num_classes):
    method = make_method(name, alpha=0.002, alpha_rampup=0.4, stop_gradient="none")
    net = _net(method, num_classes, in_channels=2)
    loss, terms = method.loss(net, _batch(num_classes, in_channels=2))
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(isinstance(v, float) and np.isfinite(v) for v in terms.values()), terms
    loss.backward()
    assert _grad_norm(net.encoder) > 0
    assert _grad_norm(net.decoders) > 0
    method.after_step(net, 5)


# -- Mean Teacher -------------------------------------------------------------------------------------

def test_mean_teacher_teacher_gets_no_gradient_and_follows_the_ema():
    method = make_method("mt", ema_decay=0.99)
    student = _net(method)
    assert method.teacher is None  # created lazily, at the first loss
    loss, terms = method.loss(student, _batch())
    teacher = method.teacher
    assert teacher is not None and teacher is not student and terms["consistency"] > 0
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert _grad_norm(student.encoder) > 0

    # the teacher starts as a copy of the student
    for t, s in zip(teacher.parameters(), student.parameters()):
        torch.testing.assert_close(t, s.detach())
    # a step of the student, then the EMA with the full decay (after the warm-up d = 1 - 1/(step+1))
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    before = [t.detach().clone() for t in teacher.parameters()]
    step = 1000
    assert method.ema_decay_at(step) == 0.99
    method.after_step(student, step)
    for t, old, s in zip(teacher.parameters(), before, student.parameters()):
        torch.testing.assert_close(t, 0.99 * old + 0.01 * s.detach())
    assert method.teacher is teacher
    # warm-up: at step 0 the teacher becomes the student, at step 1 the average of the two
    assert method.ema_decay_at(0) == 0.0 and method.ema_decay_at(1) == 0.5
    method.after_step(student, 0)
    for t, s in zip(teacher.parameters(), student.parameters()):
        torch.testing.assert_close(t, s.detach())


def test_mean_teacher_moves_its_teacher_to_the_students_device():
    method = make_method("mt")
    student = _net(method)
    method.loss(student, _batch())
    student.to("meta")  # a stand-in for a move to the GPU: no data, only a device
    teacher = method._teacher_for(student)
    assert all(p.device.type == "meta" for p in teacher.parameters())


# -- FixMatch -----------------------------------------------------------------------------------------

def test_fixmatch_pseudo_labels_and_confidence_mask():
    p = torch.tensor([0.97, 0.5, 0.02, 0.9, 0.95]).view(1, 1, 1, 5)
    labels, mask = pseudo_labels(p, 0.95)
    assert labels.tolist() == [[[1, 1, 0, 1, 1]]]
    assert mask.tolist() == [[[True, False, True, False, True]]]
    probs = torch.tensor([[0.96, 0.02, 0.02], [0.3, 0.3, 0.4], [0.01, 0.01, 0.98]]).T.reshape(1, 3, 1, 3)
    labels, mask = pseudo_labels(probs, 0.95)
    assert labels.tolist() == [[[0, 2, 2]]] and mask.tolist() == [[[True, False, True]]]
    # masked pixels contribute zero; the mean is over all pixels
    logits = torch.zeros(1, 1, 1, 5)
    labels, mask = pseudo_labels(p, 0.95)
    expected = float(torch.log(torch.tensor(2.0))) * 3 / 5
    assert abs(float(masked_pseudo_label_loss(logits, labels, mask)) - expected) < 1e-6


def test_fixmatch_unlabelled_term_is_zero_when_no_pixel_passes_and_positive_when_all_do():
    batch = _batch()
    none_pass = make_method("fixmatch", threshold=1.01)
    net = _net(none_pass)
    t = none_pass.loss_terms(net, batch)
    assert float(t["mask_fraction"]) == 0.0 and float(t["unlabelled"].detach()) == 0.0
    t["unlabelled"].backward()
    assert _grad_norm(net) == 0.0

    all_pass = make_method("fixmatch", threshold=0.0)
    net = _net(all_pass)
    t = all_pass.loss_terms(net, batch)
    assert float(t["mask_fraction"]) == 1.0 and float(t["unlabelled"].detach()) > 0
    t["unlabelled"].backward()
    assert _grad_norm(net.encoder) > 0


def test_strong_augmentation_is_photometric_keeps_shape_and_changes_the_image():
    torch.manual_seed(3)
    x = torch.randn(4, 2, 32, 32)
    y = rand_augment(x, n_ops=2, probability=1.0, cutout_fraction=0.0)
    assert y.shape == x.shape and torch.isfinite(y).all() and not torch.equal(x, y)
    # photometric: each channel stays within its own range (no pixel comes from elsewhere)
    lo, hi = x.amin((-2, -1)), x.amax((-2, -1))
    assert bool((y.amin((-2, -1)) >= lo - 1e-5).all() and (y.amax((-2, -1)) <= hi + 1e-5).all())
    holes = rand_augment(x, n_ops=0, cutout_fraction=0.5)
    assert holes.shape == x.shape


# -- CCT ----------------------------------------------------------------------------------------------

def test_cct_consistency_trains_the_aux_decoders_and_encoder_not_the_main_decoder():
    method = make_method("cct")
    net = _net(method)
    assert len(net.aux_decoders) == 4 and net.config.auxiliary == ("feature-noise", "feature-dropout", "vat", "cutout")
    t = method.loss_terms(net, _batch())
    t["consistency"].backward(retain_graph=True)
    assert all(_grad_norm(d) > 0 for d in net.aux_decoders)
    assert _grad_norm(net.decoders) == 0.0
    assert _grad_norm(net.encoder) > 0
    net.zero_grad(set_to_none=True)
    t["supervised"].backward()
    assert _grad_norm(net.aux_decoders) == 0.0 and _grad_norm(net.decoders[0]) > 0


def test_cct_inference_uses_the_main_decoder_only():
    net = _net(make_method("cct")).eval()
    x = torch.randn(2, 1, 37, 50)
    out = net(x)
    assert len(out) == 1 and out[0].shape == (2, 1, 37, 50)
    mean, per_decoder = net.predict(x)
    torch.testing.assert_close(mean, torch.sigmoid(out[0]))
    assert net.decoder_names == ["plain decoder"]


def test_vat_perturbation_has_norm_eps_and_increases_the_divergence():
    torch.manual_seed(0)
    net = _net(make_method("cct")).eval()
    features, size = net.encode(torch.randn(2, 1, 32, 32))
    decoder = net.aux_decoders[2]
    target = net.probabilities(net.decode(net.decoders[0], features, size)).detach()
    perturbed = vat_perturbation(lambda f: net.decode(decoder, f, size), features, target, eps=2.0)
    sq = sum((p - f).pow(2).flatten(1).sum(1) for p, f in zip(perturbed, features))
    torch.testing.assert_close(sq.sqrt(), torch.full((2,), 2.0))
    assert all(p.grad is None for p in decoder.parameters())


# -- MTA ----------------------------------------------------------------------------------------------

def test_mta_reconstruction_head_gets_gradient_and_is_not_an_output():
    method = make_method("mta")
    net = _net(method, in_channels=2)
    assert net.reconstruction is not None and "reconstruction" in net.config.to_dict()["auxiliary_heads"]
    t = method.loss_terms(net, _batch(in_channels=2))
    t["reconstruction"].backward(retain_graph=True)
    assert _grad_norm(net.reconstruction) > 0 and _grad_norm(net.encoder) > 0
    assert _grad_norm(net.decoders) == 0.0
    out = net(torch.randn(1, 2, 32, 32))
    assert len(out) == 1 and out[0].shape == (1, 1, 32, 32)


# -- Morph --------------------------------------------------------------------------------------------

def test_morph_prediction_is_the_mean_of_the_dilating_and_eroding_decoders():
    net = _net(make_method("morph"), num_classes=3).eval()
    assert net.decoder_names == ["dilation decoder", "erosion decoder"]
    x = torch.randn(2, 1, 32, 32)
    mean, per_decoder = net.predict(x)
    assert len(per_decoder) == 2
    torch.testing.assert_close(mean, (per_decoder[0] + per_decoder[1]) / 2)
    torch.testing.assert_close(per_decoder[0], torch.softmax(net(x)[0], 1))
    assert not torch.allclose(per_decoder[0], per_decoder[1])


@pytest.mark.parametrize("operation", ["dilate", "erode"])
def test_morphological_block_is_a_plain_block_then_a_3x3_max_or_min(operation):
    torch.manual_seed(0)
    plain = DecoderBlock(16, 8, 8)
    morph = MorphologicalDecoderBlock(16, 8, 8, operation)
    morph.load_state_dict(plain.state_dict(), strict=True)  # the same parameters
    coarse, skip = torch.randn(1, 16, 6, 6), torch.randn(1, 8, 12, 12)
    base = plain(coarse, skip)
    out = morph(coarse, skip)
    window = torch.nn.functional.unfold(torch.nn.functional.pad(base, (1, 1, 1, 1), value=float("nan")), 3)
    window = window.view(1, 8, 9, 12, 12)
    ref = window.nan_to_num(float("-inf")).amax(2) if operation == "dilate" else window.nan_to_num(float("inf")).amin(2)
    torch.testing.assert_close(out, ref)
    assert bool((grey_dilate(base) >= base).all() and (grey_erode(base) <= base).all())


# -- under a DistributedDataParallel wrapper -----------------------------------------------------------

def test_every_semi_supervised_method_runs_whole_inside_the_networks_forward():
    """The check below, in a child pytest process with a deadline: a gloo process group in the suite's long-lived
    process once hung in native code (a full CI run stopped here for 15 minutes; alone it takes 3 s and never
    did), so the child gets 180 s and one more try, and the suite never hangs on it."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
           f"{__file__}::test_ddp_wrapped_methods_in_a_child_process"]
    env = {**os.environ, "MISMATCH_DDP_CHILD": "1"}
    for attempt in range(2):
        try:
            done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  timeout=180)
        except subprocess.TimeoutExpired:
            continue
        assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-3000:]
        return
    pytest.fail("the gloo process group hung twice (180 s each)")


@pytest.mark.skipif(os.environ.get("MISMATCH_DDP_CHILD") != "1", reason="run by the test above, in a child process")
def test_ddp_wrapped_methods_in_a_child_process(tmp_path):
    """Under the multi-process engine a method gets the network wrapped in DistributedDataParallel, which
    only follows what happens inside its forward: every layer with parameters must run inside a forward
    call of the network (``forward(x, heads=...)`` for the training-only heads), the wrapper's attributes
    must reach the network's, and the teacher must copy the bare network. The wrapper is the engine's own
    (:class:`mismatch.distributed.DataParallelNetwork`, what ``Context.wrap`` gives on several processes)."""
    import copy

    import torch.distributed as dist

    from mismatch.distributed import DataParallelNetwork

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for name in BASELINES + ["mismatch"]:
            method = make_method(name)
            net = _net(method)
            wrapped = DataParallelNetwork(net)
            assert wrapped.config is net.config and wrapped.decoder_names == net.decoder_names
            assert type(copy.deepcopy(wrapped)) is SegmentationNetwork   # a copy is never trained through DDP
            if name == "mt":
                method._teacher_for(wrapped)  # before the hooks, so that the teacher does not carry them
            inside, outside = [False], []
            net.register_forward_pre_hook(lambda m, a: inside.__setitem__(0, True))
            net.register_forward_hook(lambda m, a, o: inside.__setitem__(0, False))
            for layer_name, layer in net.named_modules():
                if any(True for _ in layer.parameters(recurse=False)):
                    layer.register_forward_pre_hook(
                        lambda m, a, n=layer_name: None if inside[0] else outside.append(n))
            opt = torch.optim.SGD(net.parameters(), lr=1e-3)
            for step in range(2):
                opt.zero_grad(set_to_none=True)
                loss, _ = method.loss(wrapped, _batch(step=step))
                loss.backward()
                opt.step()
                method.after_step(net, step)
            assert not outside, (name, outside[:3])
            assert _grad_norm(net.encoder) > 0, name
            if name == "mt":
                assert type(method.teacher) is SegmentationNetwork
    finally:
        dist.destroy_process_group()


# -- every method through the command line ------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_case(tmp_path_factory):
    d = tmp_path_factory.mktemp("baselines")
    image, labels, _ = disc_volume((6, 32, 32), (16, 15), 6, [1, 4])
    for name, arr in (("image.nrrd", image), ("labels.nrrd", labels)):
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(d / name))
    return d


@pytest.mark.parametrize("name", BASELINES + ORIGINAL)
def test_every_method_trains_three_steps_and_its_model_segments(name, tiny_case):
    d = tiny_case
    out = d / f"model-{name}"
    assert main(["train", str(d / "image.nrrd"), "--labels", str(d / "labels.nrrd"), "--out", str(out),
                 "--method", name, "--steps", "3", "--width", "4", "--patch-size", "0", "--batch-size", "2",
                 "--device", "cpu"]) == 0
    card = json.loads((out / "model.json").read_text())
    assert card["architecture"]["name"] == make_method(name).architecture
    assert card["training"]["method"] == name and card["summary"]["steps"] == 3
    seg = d / f"seg-{name}.nrrd"
    assert main(["segment", str(d / "image.nrrd"), "--model", str(out), "--out", str(seg),
                 "--device", "cpu"]) == 0
    result = sitk.GetArrayFromImage(sitk.ReadImage(str(seg)))
    assert result.shape == (6, 32, 32) and set(np.unique(result)) <= {0, 1}


def test_mean_teacher_teacher_is_checkpointed_and_restored_on_resume(tmp_path):
    from mismatch.modelfile import load_checkpoint
    from mismatch.train import TrainConfig, fit

    from discs import two_painted_squares

    vol, labels = two_painted_squares()
    config = TrainConfig(method="mt", steps=3, width=4, batch_size=1, patch_size=16, checkpoint_every=2)
    fit([vol], labels, np.array([1, 4]), 2, config, checkpoint_dir=tmp_path)
    tensors, _ = load_checkpoint(tmp_path)
    teacher = {k[len("method.teacher."):]: v for k, v in tensors.items() if k.startswith("method.teacher.")}
    student = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    assert teacher and set(teacher) == set(student)
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher)  # an EMA, not a copy

    method = make_method("mt")
    net = _net(method)
    net.load_state_dict(student)
    method.load_state_dict({k[len("method."):]: v for k, v in tensors.items() if k.startswith("method.")}, net)
    for k, v in method.teacher.state_dict().items():
        assert torch.equal(v, teacher[k])
    resumed = fit([vol], labels, np.array([1, 4]), 2, TrainConfig(**{**config.to_dict(), "steps": 4,
                                                                        "hu_window": None}),
                  checkpoint_dir=tmp_path, resume=True)
    assert resumed.steps_done == 4
