"""The panel's side of the annotate-and-retrain loop: retraining from the current model is a warm-start round
by default, and "Label next" says why the suggested slice was chosen."""

from __future__ import annotations

import json


from conftest import standin_command

from MisMatchSegmentationLib.logic import MisMatchLogic, SegmentRequest, TrainingRequest, next_slice_hint


def calls(log) -> list[dict]:
    return [json.loads(line) for line in (log / "calls.jsonl").read_text().splitlines()]


def test_next_slice_hint_says_why():
    row = {"slice": 37, "disagreement": 0.02, "disagreeing_fraction": 0.041, "uncertain_fraction": 0.1,
           "distance": 12}
    assert next_slice_hint(row) == "slice 37: the decoders disagree on 4.1 % of it and it is 12 slices from any " \
                                   "painted slice"
    assert next_slice_hint(row, labelled=[36, 50]).endswith("and it is next to a painted slice")
    unet = {"slice": 5, "disagreement": 0.0, "disagreeing_fraction": 0.0, "uncertain_fraction": 0.0005}
    assert next_slice_hint(unet) == "slice 5: the model is unsure of under 0.1 % of it"
    ranked = dict(row, expected_error=0.03, ranking="expected-error-distance")
    assert next_slice_hint(ranked) == ("slice 37: the decoders disagree on 4.1 % of it, about 3.0 % of it is "
                                       "expected to be wrong and it is 12 slices from any painted slice")
    assert next_slice_hint({"slice": 3, "disagreement": 0.2}) == "slice 3: the decoders disagree most here"
    assert next_slice_hint({"slice": 3}) == "slice 3: the most uncertain of the slices not painted"
    assert next_slice_hint(dict(row, ranking="gap")) == ("slice 37: it is 12 slices from any painted slice, in the "
                                                         "widest unpainted stretch of the structure and the "
                                                         "decoders disagree on 4.1 % of it")
    assert next_slice_hint(dict(row, ranking="gap", beyond_prediction=True)).startswith(
        "slice 37: it is 12 slices from any painted slice, past where the segmentation ends, but the network alone "
        "still sees the structure there: paint it, or list it under Empty slices if the structure has ended")
    fill = {"slice": 37, "disagreement": 0.0, "distance": 12, "ranking": "gap", "beyond_filled": True}
    assert next_slice_hint(fill) == (
        "slice 37: it is 12 slices from any painted slice, past where the fill ends, but the image there still "
        "looks like your painted structure: paint it, or list it under Empty slices if the structure has ended")
    assert next_slice_hint(dict(row, ranking="gap", structure_goes_on=True)).startswith(
        "slice 37: it is 12 slices from any painted slice, past your painted slices, where the network alone sees "
        "the structure go on and the segmentation follows it: check it, or list it under Empty slices")


def _request(volume, labels, **kw) -> TrainingRequest:
    ids = [labels.GetSegmentation().GetNthSegmentID(n) for n in range(labels.GetSegmentation().GetNumberOfSegments())]
    return TrainingRequest(volumes=[volume], segmentation=labels, segment_ids=ids, steps=5, device="cpu", **kw)


def test_retrain_from_the_current_model_is_a_warm_start_unless_asked(ct_chest, tmp_path, standin_log):
    volume, labels = ct_chest
    logic = MisMatchLogic(work_dir=tmp_path / "work", command=standin_command("ok"))
    logic.start_training(_request(volume, labels))
    assert logic.wait(timeout=60)[-1]["status"] == "completed"
    first = logic.current_model
    logic.start_training(_request(volume, labels, init_model=first))
    assert logic.wait(timeout=60)[-1]["status"] == "completed"
    logic.start_training(_request(volume, labels, init_model=logic.current_model, warm_start=False))
    assert logic.wait(timeout=60)[-1]["status"] == "completed"
    new, warm, full = (c["args"] for c in calls(standin_log)[:3])
    assert "--init" not in new and "--no-warm-start" not in new
    assert warm[warm.index("--init") + 1] == str(first) and "--no-warm-start" not in warm   # the engine's default
    assert "--init" in full and "--no-warm-start" in full


def test_segmenting_names_the_slice_to_label_next_and_why(ct_chest, tmp_path, standin_log):
    volume, labels = ct_chest
    logic = MisMatchLogic(work_dir=tmp_path / "work", command=standin_command("ok"))
    logic.start_training(_request(volume, labels))
    logic.wait(timeout=60)
    logic.start_segmenting(SegmentRequest(volumes=[volume], model=logic.current_model, device="cpu",
                                          segmentation=labels))
    done = logic.wait(timeout=60)[-1]
    assert done["status"] == "completed"
    top = logic.report["uncertain_slices"][0]
    assert f"Label next: slice {top['slice']}:" in done["message"]
    chosen, _ = logic.next_uncertain_slice(volume, labels, jump=False)
    assert logic.next_hint.startswith(f"slice {chosen}: ")
    assert "slices from any painted slice" in logic.next_hint or "next to a painted slice" in logic.next_hint
