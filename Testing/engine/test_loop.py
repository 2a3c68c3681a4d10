"""The annotate-and-retrain loop: ``mismatch simulate`` (policies, resumable rounds, report), the warm-start
settings of a round that continues from a model, and the slice rankings ``segment`` writes."""

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from mismatch.benchmark import loop
from mismatch.benchmark.datasets import Case
from mismatch.cli import main
from mismatch.errors import UserError
from mismatch.ranking import DEFAULT_RANKING, RANKINGS, distance_weight, rank_uncertain_slices
from mismatch.io import Geometry
from mismatch.modelfile import load_optimizer_moments, optimizer_to_tensors, read_optimizer_state
from mismatch.models import ArchitectureConfig, SegmentationNetwork
from mismatch.train import WARM_START, TrainConfig, patch_size_at, preset_config, warm_start_config

TINY = dict(steps=3, width=4, batch_size=2, patch_size=0, lr=2e-3, device="cpu")


def tiny_case(k: int = 12, name: str = "tiny") -> Case:
    """A ``k``-slice volume of 20 x 20 with a bright blob on the middle slices (radius changing along k)."""
    rng = np.random.default_rng(0)
    zz, yy, xx = np.mgrid[:k, :20, :20]
    radius = 6.0 - 0.9 * np.abs(zz - k / 2)
    blob = ((yy - 10) ** 2 + (xx - 9) ** 2) < np.clip(radius, 0, None) ** 2
    image = np.where(blob, 1.0, 0.0) + rng.normal(0, 0.2, blob.shape)
    geometry = Geometry((20, 20, k), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    return Case(name, image.astype(np.float32)[None], blob.astype(np.uint8), geometry, axis=0)


# -- the policies -------------------------------------------------------------------------------------------

def test_even_slices_are_the_centres_of_equal_parts_of_the_extent():
    assert loop.even_slices(range(10, 20), 1, 30) == [14]     # the middle (lower of the two)
    assert loop.even_slices(range(10, 20), 2, 30) == [12, 17]
    assert loop.even_slices(range(0, 30), 3, 30) == [4, 14, 24]
    assert loop.even_slices([5, 6], 4, 30) == [4, 5, 6, 7]      # a short extent widens
    assert loop.even_slices([0, 1], 3, 2) == [0, 1]             # ... within the volume


def test_largest_gap_and_random_slices():
    assert loop.largest_gap_slice(range(0, 21), [10]) == 0      # the farthest, the lowest on a tie
    assert loop.largest_gap_slice(range(0, 21), [0, 20]) == 10
    assert loop.largest_gap_slice(range(3, 5), [3, 4]) is None
    a = loop.random_slice(range(10), [2, 3], 30, seed=1, n=3)
    assert a == loop.random_slice(range(10), [2, 3], 30, seed=1, n=3) and a in set(range(10)) - {2, 3}
    assert loop.random_slice([1], [1], 3, seed=0, n=2) in (0, 2)   # the extent is used up: any free slice


def test_next_labelled_follows_each_policy():
    record = {"suggestions": {r: i + 20 for i, r in enumerate(RANKINGS)}}
    default = 20 + RANKINGS.index(DEFAULT_RANKING)
    assert loop.next_labelled("suggested", [3], record, range(30), 40, 0) == [3, default]
    assert loop.next_labelled("suggested-expected-error", [3], record, range(30), 40, 0) == [3, 22]
    assert loop.next_labelled("even", [3], record, range(0, 30), 40, 0) == loop.even_slices(range(0, 30), 2, 40)
    assert loop.next_labelled("largest-gap", [0, 29], record, range(0, 30), 40, 0) == [0, 14, 29]
    assert loop.next_labelled("suggested", [3], {"suggestions": {r: None for r in RANKINGS}}, range(9), 9, 0) is None


# -- the rankings -------------------------------------------------------------------------------------------

def _scores(n=20):
    return [{"slice": s, "disagreement": 0.1 if s in (1, 10) else 0.01, "uncertain_fraction": 0.0,
             "expected_error": 0.05 * (s == 15), "foreground_fraction": 0.1, "disagreeing_fraction": 0.02}
            for s in range(n)]


def test_rankings_order_and_distance():
    scores = _scores()
    plain = rank_uncertain_slices(scores, exclude=[0], ranking="disagreement")
    assert [r["slice"] for r in plain[:2]] == [1, 10] and plain[0]["distance"] == 1
    weighted = rank_uncertain_slices(scores, exclude=[0], ranking="disagreement-distance")
    assert weighted[0]["slice"] == 10          # as uncertain as slice 1, and far from the painted slice 0
    assert weighted[0]["score"] == pytest.approx(0.1 * distance_weight(10, 20, 1))
    assert rank_uncertain_slices(scores, exclude=[0], ranking="expected-error")[0]["slice"] == 15
    assert all(r["slice"] != 0 for r in weighted)
    assert distance_weight(0, 20, 2) == 0 and distance_weight(None, 20, 0) == 1
    assert 0.6 < distance_weight(20 / 6, 20, 2) < 0.65   # 1 - 1/e at half the even gap
    with pytest.raises(ValueError, match="ranking"):
        rank_uncertain_slices(scores, ranking="nonsense")


def test_the_gap_ranking_fills_the_widest_stretch_of_the_predicted_structure():
    scores = _scores(30)
    for row in scores:   # the structure predicted on slices 4 to 20, a speck on 25
        row["foreground_fraction"] = 0.2 if 4 <= row["slice"] <= 20 else (0.001 if row["slice"] == 25 else 0.0)
    ranked = rank_uncertain_slices(scores, exclude=[6, 10], ranking="gap")
    # the stretch beyond slice 10 is the widest (10 slices to the predicted end at 20): two thirds of the way
    # to the end, so that the new slice is about half a gap inside the end, as evenly spaced slices are
    assert ranked[0]["slice"] == 17 and ranked[0]["distance"] == 7
    assert ranked[0]["score"] == pytest.approx(10 - 1 / 3 + 0.01)
    assert ranked[1]["slice"] == 16
    assert {r["slice"] for r in ranked} == set(range(4, 21)) - {6, 10}   # not the speck, not outside
    one = rank_uncertain_slices(scores, exclude=[12], ranking="gap")     # one painted slice in the middle:
    assert {one[0]["slice"], one[1]["slice"]} == {7, 17}   # about a third of the way in from each end
    ties = rank_uncertain_slices(scores, exclude=[4, 20], ranking="gap")
    assert ties[0]["slice"] == 12 and ties[0]["distance"] == 8   # the middle of the gap between 4 and 20
    scores[16]["disagreement"] = 0.2   # slices 8 and 16 are both 4 from a painted slice: the disagreement decides
    ties = rank_uncertain_slices(scores, exclude=[4, 12, 20], ranking="gap")
    assert [(r["slice"], r["distance"]) for r in ties[:2]] == [(16, 4), (8, 4)]
    nothing = [dict(r, foreground_fraction=0.0) for r in scores]   # no structure predicted: every slice
    assert len(rank_uncertain_slices(nothing, exclude=[6], ranking="gap")) == 29


def test_the_gap_ranking_looks_past_a_prediction_the_prior_ended_where_the_network_goes_on():
    # painted 20, 23, 26 (a gap of 3); the prediction ends at 17 on one side and 29 on the other
    scores = _scores(40)
    for row in scores:
        s = row["slice"]
        row["foreground_fraction"] = 0.2 if 17 <= s <= 29 else 0.0
        row["network_box_fraction"] = 0.3 if s <= 29 else 0.02   # the network goes on down to slice 0 only
        row["network_on_painted"] = 0.6   # mostly where the outermost painted slice's structure is
    ranked = rank_uncertain_slices(scores, exclude=[20, 23, 26], ranking="gap")
    # the structure as the network sees it reaches slice 0: two thirds of the 20 slices from 20 to 0
    assert ranked[0]["slice"] == 7 and ranked[0]["beyond_prediction"] is True
    assert not any(r.get("beyond_prediction") for r in ranked if r["slice"] >= 17)
    assert max(r["slice"] for r in ranked) == 29   # a tenth of the painted cross-section: not the structure
    # a stretch no longer than the painted gap (a lesion's neighbourhood for a slice or two) is left out
    short = [dict(r, network_box_fraction=0.3 if 15 <= r["slice"] <= 29 else 0.0) for r in scores]
    assert min(r["slice"] for r in rank_uncertain_slices(short, exclude=[20, 23, 26], ranking="gap")) == 17
    # far more (or far less) than the network's own cross-section on the painted slice: something else
    other = [dict(r, network_box_fraction=0.9 if r["slice"] < 17 else 0.3) for r in scores]
    assert min(r["slice"] for r in rank_uncertain_slices(other, exclude=[20, 23, 26], ranking="gap")) == 17
    # about the size, but beside the painted structure: something else
    beside = [dict(r, network_on_painted=0.1 if r["slice"] < 17 else 0.6) for r in scores]
    assert min(r["slice"] for r in rank_uncertain_slices(beside, exclude=[20, 23, 26], ranking="gap")) == 17
    # the painted structure's place and size, but not its intensities (the organ under painted lungs)
    unlike = [dict(r, network_intensity=-1.5 if r["slice"] < 17 else 1.0) for r in scores]
    assert min(r["slice"] for r in rank_uncertain_slices(unlike, exclude=[20, 23, 26], ranking="gap")) == 17
    like = [dict(r, network_intensity=1.0) for r in scores]
    assert rank_uncertain_slices(like, exclude=[20, 23, 26], ranking="gap")[0]["slice"] == 7
    # one painted slice: the prior has no end rule, nothing is added; no network scores: as before
    assert min(r["slice"] for r in rank_uncertain_slices(scores, exclude=[23], ranking="gap")) == 17
    bare = [{k: v for k, v in r.items() if k != "network_box_fraction"} for r in scores]
    assert min(r["slice"] for r in rank_uncertain_slices(bare, exclude=[20, 23, 26], ranking="gap")) == 17


def test_slice_scores_carry_what_the_rankings_and_the_hint_need():
    from mismatch.inference import segment_volume

    net = SegmentationNetwork(ArchitectureConfig(name="mismatch", in_channels=1, num_classes=2, width=4)).eval()
    case = tiny_case(6)
    seg = segment_volume([net], case.image, device="cpu", outputs=())
    row = seg.slice_scores[0]
    assert 0 <= row["disagreeing_fraction"] <= 1 and 0 <= row["expected_error"] <= 0.5
    assert "network_box_fraction" not in row   # without the painted slices' prior there is no painted box
    from mismatch.pipeline import painted_slice_prior

    sparse = np.zeros_like(case.label)
    sparse[[1, 4]] = case.label[[1, 4]]
    prior = painted_slice_prior(sparse, [1, 4], "k", (1.0, 1.0, 1.0), 2, None)
    seg = segment_volume([net], case.image, device="cpu", outputs=(), prior=prior)
    assert all(0 <= r["network_box_fraction"] <= 1 for r in seg.slice_scores)
    assert [r["slice"] for r in seg.slice_scores if "network_on_painted" in r] == [0, 5]   # past 1 and 4 only
    assert all(0 <= r.get("network_on_painted", 0) <= 1 for r in seg.slice_scores)


# -- warm start ---------------------------------------------------------------------------------------------

def test_warm_start_config_is_a_fraction_of_the_first_training():
    first = TrainConfig(steps=200, lr=2e-3)
    warm = warm_start_config(first)
    assert warm.steps == math.ceil(WARM_START["steps_fraction"] * 200) and warm.steps <= 40
    assert warm.lr == pytest.approx(WARM_START["lr_fraction"] * 2e-3)
    assert warm.alpha_rampup == 0 and first.steps == 200   # a new object
    assert warm_start_config(first, {"steps_fraction": 0.5}).steps == 100
    assert warm_start_config(TrainConfig(steps=1)).steps == 1


def test_only_a_first_training_starts_on_the_smaller_patches():
    first = TrainConfig(steps=180)
    assert [patch_size_at(s, first) for s in (0, 89, 90, 179)] == [96, 96, 128, 128]
    warm = warm_start_config(first)   # the network has the coarse shape already: full patches throughout
    assert {patch_size_at(s, warm) for s in range(warm.steps)} == {128}
    assert patch_size_at(0, preset_config("paper")) == 176              # the paper's recipe is unchanged
    assert patch_size_at(0, TrainConfig(patch_size=0)) is None          # whole slices stay whole
    assert patch_size_at(0, TrainConfig(patch_size=64)) == 64           # never larger than the patch


def _write(array, path):
    img = sitk.GetImageFromArray(array)
    img.SetSpacing((1.0, 1.0, 2.0))
    sitk.WriteImage(img, str(path))
    return str(path)


def test_train_with_init_is_a_warm_start_unless_told_otherwise(tmp_path):
    case = tiny_case(8)
    image = _write(case.image[0], tmp_path / "image.nrrd")
    sparse = np.zeros_like(case.label)
    sparse[[3, 5]] = case.label[[3, 5]]
    labels = _write(sparse, tmp_path / "labels.nrrd")
    tiny = ["--width", "4", "--patch-size", "0", "--batch-size", "2", "--device", "cpu"]
    assert main(["train", image, "--labels", labels, "--out", str(tmp_path / "m0"), "--steps", "8", *tiny]) == 0
    assert main(["train", image, "--labels", labels, "--out", str(tmp_path / "m1"), "--steps", "8",
                 "--init", str(tmp_path / "m0"), *tiny]) == 0
    card = json.loads((tmp_path / "m1" / "model.json").read_text())
    assert card["summary"]["steps"] == 2 and card["training"]["lr"] == pytest.approx(1e-3)
    assert card["training"]["alpha_rampup"] == 0
    assert main(["train", image, "--labels", labels, "--out", str(tmp_path / "m2"), "--steps", "8",
                 "--init", str(tmp_path / "m0"), "--no-warm-start", *tiny]) == 0
    assert json.loads((tmp_path / "m2" / "model.json").read_text())["summary"]["steps"] == 8
    # the optimiser's state is saved with each model and continued by the next round: Adam's step count
    # carries on from the first training's 8 steps
    steps = {name: read_optimizer_state(tmp_path / name)["optim.0.step"].item() for name in ("m0", "m1", "m2")}
    assert steps == {"m0": 8, "m1": 10, "m2": 16}


def test_optimizer_moments_are_loaded_only_where_they_fit():
    def adam(width):
        net = SegmentationNetwork(ArchitectureConfig(name="mismatch", in_channels=1, num_classes=2, width=width))
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0)
        net(torch.randn(1, 1, 16, 16))[0].sum().backward()
        opt.step()
        return opt

    trained, fresh = adam(4), adam(4)
    fresh.param_groups[0]["lr"] = 5e-4
    tensors = optimizer_to_tensors(trained)[0]
    assert load_optimizer_moments(fresh, tensors)
    assert fresh.param_groups[0]["lr"] == 5e-4   # its own settings are kept
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], trained.state_dict()["state"][0]["exp_avg"])
    wider = adam(8)
    before = wider.state_dict()["state"][0]["exp_avg"].clone()
    assert not load_optimizer_moments(wider, tensors)   # another width: nothing changed
    assert torch.equal(wider.state_dict()["state"][0]["exp_avg"], before)


def test_a_warm_round_of_the_simulation_continues_the_optimiser_state():
    case = tiny_case(8)
    config = _config().train_config("mismatch", seed=0, axis="k", checkpoint_every=10 ** 9)
    first, state = loop.train_round(case, case.image, [3, 5], config, torch.device("cpu"), keep_scores=True)
    assert state["optim.0.step"].item() == config.steps
    assert [row["slice"] for row in first["slice_scores"]] == list(range(8))   # what the rankings read
    warm, after = loop.train_round(case, case.image, [3, 4, 5], config, torch.device("cpu"), init_state=state)
    assert after["optim.0.step"].item() == 2 * config.steps
    assert "slice_scores" not in warm   # only when asked for


# -- the simulation -----------------------------------------------------------------------------------------

def _config(**kw):
    base = dict(datasets=["tiny"], methods=["mismatch"], start=[1], max_labelled=3, seeds=1,
                policies=["suggested", "even"], **TINY)
    base.update(kw)
    return loop.LoopConfig(**base)


def test_simulation_runs_every_round_resumes_and_reports(tmp_path, monkeypatch):
    cases = {"tiny": [tiny_case()]}
    data = loop.run_simulation(_config(), tmp_path, cases=cases, log=lambda m: None)
    rounds = data["rounds"]
    assert len(data["references"]) == 1 and data["references"][0]["n_test"] == 12
    assert data["references"][0]["steps"] == 3 * loop.REFERENCE_STEPS_FACTOR   # trained longer than a round
    for policy in ("suggested", "even"):
        mine = sorted((r for r in rounds if r["policy"] == policy), key=lambda r: r["n_labelled"])
        assert [r["n_labelled"] for r in mine] == [1, 2, 3]
        assert [r["init"] for r in mine] == ["first", "warm", "warm"]
        assert mine[1]["steps"] == 1 and mine[0]["steps"] == 3       # ceil(0.2 * 3)
        for r in mine:
            assert r["n_test"] == 12 - r["n_labelled"] and 0 <= r["iou"] <= 1 and r["ece_band"] is not None
            assert r["iou"] <= r["iou_volume"] <= 1   # the painted slices count as right in the whole volume
            assert set(r["suggestions"]) == set(RANKINGS)
        for a, b in zip(mine, mine[1:]):
            assert set(a["labelled_slices"]) < set(b["labelled_slices"]) or policy == "even"
    suggested = sorted((r for r in rounds if r["policy"] == "suggested"), key=lambda r: r["n_labelled"])
    assert suggested[1]["added"] == suggested[0]["suggestions"][DEFAULT_RANKING]
    even = sorted((r for r in rounds if r["policy"] == "even"), key=lambda r: r["n_labelled"])
    assert even[2]["labelled_slices"] == loop.even_slices(loop.extent(cases["tiny"][0].label, 0), 3, 12)
    report = (tmp_path / "results.md").read_text()
    assert "| suggested |" in report and "slices needed" in report and "Seconds per round" in report
    assert "The whole volume the user has after each round" in report
    volume_table = report.split("The whole volume the user has after each round")[1].split("\n\n")[1]
    assert "slices needed" in volume_table.splitlines()[0]    # against the reference, on the whole volume too
    assert (tmp_path / "loop-tiny-mismatch-k1.png").stat().st_size > 1000
    assert not list((tmp_path / loop.STATES_DIR).glob("*.pt"))   # every trajectory done: no model kept

    # again: nothing to train
    monkeypatch.setattr(loop, "train_round", lambda *a, **k: pytest.fail("trained again"))
    again = loop.run_simulation(_config(), tmp_path, cases=cases, log=lambda m: None)
    assert len(again["rounds"]) == len(rounds)
    with pytest.raises(Exception, match="other training settings"):
        loop.run_simulation(_config(steps=4), tmp_path, cases=cases, log=lambda m: None)


def test_an_even_start_gives_every_policy_the_evenly_spaced_first_slices(tmp_path):
    case = tiny_case()
    config = _config(start=[2], policies=["suggested", "even"], reference=False, start_placement="even")
    data = loop.run_simulation(config, tmp_path, cases={"tiny": [case]}, log=lambda m: None)
    first = {r["policy"]: r for r in data["rounds"] if r["init"] == "first"}
    even2 = loop.even_slices(loop.extent(case.label, 0), 2, 12)
    assert first["suggested"]["labelled_slices"] == first["even"]["labelled_slices"] == even2
    assert first["suggested"]["shared_name"] == first["even"]["shared_name"]   # one training for both
    assert "evenly spaced over the structure's extent for every policy" in (tmp_path / "results.md").read_text()
    with pytest.raises(Exception, match="other training settings"):   # not mixed with drawn starts
        loop.run_simulation(_config(start=[2], policies=["suggested"], reference=False), tmp_path,
                            cases={"tiny": [case]}, log=lambda m: None)
    with pytest.raises(UserError, match="start-placement"):
        loop.check_config(_config(start_placement="middle"), ["tiny"])


def test_an_interrupted_simulation_loses_at_most_the_round_in_progress(tmp_path, monkeypatch):
    from mismatch.errors import Cancelled

    cases = {"tiny": [tiny_case()]}
    real = loop.train_round
    calls = []

    def stop_on_the_fourth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise Cancelled("stopped by SIGINT")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_round", stop_on_the_fourth)
    config = _config(policies=["largest-gap", "random"], reference=False, scratch=True)
    with pytest.raises(Cancelled):
        loop.run_simulation(config, tmp_path, cases=cases, log=lambda m: None)
    kept = json.loads((tmp_path / loop.RESULTS_FILE).read_text())["rounds"]
    assert len(kept) == 3          # first, warm 2, scratch 2 of largest-gap; the fourth was in progress
    monkeypatch.setattr(loop, "train_round", real)
    data = loop.run_simulation(config, tmp_path, cases=cases, log=lambda m: None)
    keys = [(r["policy"], r["n_labelled"], r["init"]) for r in data["rounds"]]
    assert len(keys) == len(set(keys))
    assert sorted(k for k in keys if k[0] == "largest-gap") == [
        ("largest-gap", 1, "first"), ("largest-gap", 2, "scratch"), ("largest-gap", 2, "warm"),
        ("largest-gap", 3, "scratch"), ("largest-gap", 3, "warm")]
    # random shares largest-gap's first round (same draw): copied, not trained again
    first = [r for r in data["rounds"] if r["init"] == "first"]
    assert {r["policy"] for r in first} == {"largest-gap", "random"}
    assert [r.get("copied_from") for r in first if r["policy"] == "random"] == ["largest-gap"]
    assert "Warm start against training from scratch" in (tmp_path / "results.md").read_text()
    assert "| tiny | mismatch | 4 |" in (tmp_path / "results.md").read_text()


def test_simulate_command(tmp_path, monkeypatch, capsys):
    from mismatch.benchmark import datasets

    monkeypatch.setitem(datasets.DATASETS, "tiny", lambda **kw: [tiny_case(8)])
    out = tmp_path / "sim"
    args = ["simulate", "--out", str(out), "--datasets", "tiny", "--methods", "unet-strong", "--start", "2",
            "--max-labelled", "3", "--seeds", "1", "--policies", "suggested-expected-error-distance",
            "--steps", "2", "--width", "4", "--patch-size", "0", "--batch-size", "2", "--device", "cpu",
            "--no-reference"]
    assert main(args) == 0
    data = json.loads((out / "loop.json").read_text())
    assert [r["n_labelled"] for r in data["rounds"]] == [2, 3] and not data["references"]
    assert main(["simulate", "--out", str(out), "--report-only"]) == 0
    assert main(["simulate", "--out", str(tmp_path / "none"), "--report-only"]) == 2
    with pytest.raises(SystemExit) as exit_:
        main(args[:-1] + ["--policies", "nonsense"])
    assert exit_.value.code == 2
    assert main(["simulate", "--out", str(tmp_path / "x"), "--datasets", "tiny", "--start", "5",
                 "--max-labelled", "3"]) == 2
    assert "--max-labelled 3 is below" in capsys.readouterr().err


def test_volume_iou_counts_the_painted_slices_as_right():
    sparse = np.zeros((4, 3, 3), np.uint8)
    sparse[0, :2, :2] = 1        # 4 painted voxels of class 1, none of class 2
    classes = {"1": {"tp": 6, "fp": 2, "fn": 2}, "2": {"tp": 1, "fp": 1, "fn": 0}}
    assert loop.volume_iou(classes, sparse) == pytest.approx(((6 + 4) / (10 + 4) + 1 / 2) / 2)
    assert loop.volume_iou({}, sparse) is None


def test_slices_needed_per_run_and_runs_that_never_got_there():
    by_n = {3: {"a": 0.5, "b": 0.9}, 4: {"a": 0.95, "b": 0.96}}
    assert sorted(loop._needed(by_n, 0.9, 4)) == [3, 4]
    assert loop._needed_text(loop._needed(by_n, 0.9, 4), 4) == "3.5"
    assert loop._needed(by_n, 0.99, 4) == [5, 5]                       # never reached: one past the last round
    assert loop._needed_text(loop._needed(by_n, 0.99, 4), 4) == "5.0 (2 >4)"
    assert loop._needed(by_n, None, 4) == [] and loop._needed_text([], 4) == "–"   # no reference
