"""The panel's state machine: which actions are enabled in each state and what each event does."""

from __future__ import annotations

import pytest

from MisMatchSegmentationLib.state import PanelStateMachine, State, TransitionError


def ready(model: bool = False) -> PanelStateMachine:
    m = PanelStateMachine()
    m.set_inputs(True, "")
    m.set_model(model)
    return m


def enabled(m: PanelStateMachine) -> dict:
    v = m.view()
    return {"train": v.train.enabled, "segment": v.segment.enabled, "next": v.next_uncertain,
            "save": v.save_model, "import": v.import_model, "inputs": v.edit_inputs}


def test_no_input_offers_only_choosing_inputs_and_importing_a_model():
    m = PanelStateMachine()
    assert m.state == State.NO_INPUT
    assert enabled(m) == {"train": False, "segment": False, "next": False, "save": False, "import": True,
                          "inputs": True}
    assert "input volume" in m.view().train.tooltip
    with pytest.raises(TransitionError):
        m.start_training()


def test_ready_without_labels_says_why_train_is_disabled():
    m = PanelStateMachine()
    m.set_inputs(True, "Paint the structure on a few slices first")
    assert m.state == State.READY
    assert not m.view().train.enabled and m.view().train.tooltip == "Paint the structure on a few slices first"
    assert "paint the structure" in m.status
    m.set_inputs(True, "")
    assert m.view().train.enabled and not m.view().segment.enabled


def test_training_turns_train_into_cancel_and_locks_everything_else():
    m = ready(model=True)
    m.set_uncertainty(True)
    m.start_training()
    v = m.view()
    assert m.state == State.TRAINING
    assert (v.train.enabled, v.train.text) == (True, "Cancel")
    assert enabled(m) == {"train": True, "segment": False, "next": False, "save": False, "import": False,
                          "inputs": False}
    assert v.progress_visible
    with pytest.raises(TransitionError):
        m.start_segmenting()


def test_segmenting_turns_segment_into_cancel():
    m = ready(model=True)
    m.start_segmenting()
    v = m.view()
    assert (v.segment.enabled, v.segment.text) == (True, "Cancel")
    assert not v.train.enabled and v.train.text == "Train"


def test_cancel_goes_through_cancelling_back_to_ready():
    m = ready(model=True)
    m.start_training()
    m.request_cancel()
    v = m.view()
    assert m.state == State.CANCELLING
    assert not v.train.enabled and not v.segment.enabled and v.train.text.startswith("Cancelling")
    m.finish("cancelled", "cancelled at step 12")
    assert m.state == State.READY and m.status.startswith("Cancelled.")
    assert enabled(m)["train"] and enabled(m)["segment"]


def test_failure_keeps_the_panel_usable_and_says_what_happened():
    m = ready()
    m.start_training()
    m.finish("failed", "the engine was killed (SIGKILL)")
    assert m.state == State.FAILED
    assert m.status == "Failed: the engine was killed (SIGKILL)"
    assert enabled(m)["train"] and enabled(m)["inputs"] and not m.view().progress_visible


def test_completion_enables_segment_and_next_uncertain_slice():
    m = ready()
    m.start_training()
    m.finish("completed", "Trained 300 steps")
    m.set_model(True)
    assert m.state == State.COMPLETED and m.status == "Trained 300 steps"
    assert enabled(m)["segment"] and enabled(m)["save"] and not enabled(m)["next"]
    m.start_segmenting()
    m.finish("completed", "Segmented")
    m.set_uncertainty(True)
    assert enabled(m)["next"]


def test_losing_the_input_volume():
    m = ready(model=True)
    m.set_inputs(False)
    assert m.state == State.NO_INPUT and not enabled(m)["segment"]
    # while a job runs, the state stays until it finishes
    m = ready(model=True)
    m.start_segmenting()
    m.set_inputs(False)
    assert m.state == State.SEGMENTING
    m.finish("completed", "done")
    assert m.state == State.NO_INPUT


def test_events_that_do_not_fit_the_state_are_refused():
    m = ready()
    with pytest.raises(TransitionError):
        m.request_cancel()
    with pytest.raises(TransitionError):
        m.finish("completed")
    with pytest.raises(TransitionError):
        m.start_segmenting()  # no model


def test_listeners_get_every_change():
    m = PanelStateMachine()
    seen = []
    m.listeners.append(lambda view: seen.append(view.state))
    m.set_inputs(True, "")
    m.start_training()
    m.report("Training: step 3/300")
    m.finish("completed", "ok")
    assert seen == [State.READY, State.TRAINING, State.TRAINING, State.COMPLETED]


def test_a_kept_checkpoint_offers_resume_until_a_job_starts():
    m = ready(model=False)
    assert not m.view().resume
    m.start_training()
    assert "checkpoint is kept" in m.view().train.tooltip
    m.request_cancel()
    m.finish("cancelled", "")
    m.set_checkpoint(True)
    assert m.view().resume and m.view().train.enabled
    m.start_training(resume=True)
    assert m.state == State.TRAINING and "resuming" in m.status and not m.view().resume
    m.finish("completed", "Trained.")
    assert not m.view().resume
    with pytest.raises(TransitionError):
        m.start_training(resume=True)


def test_scene_closed_while_a_job_runs_rearms_the_panel():
    m = ready(model=True)
    m.set_uncertainty(True)
    m.start_segmenting()
    m.abort("The scene was closed: the job was cancelled and its results discarded.")
    assert m.state == State.READY and m.status.startswith("The scene was closed")
    v = m.view()
    assert v.train.text == "Train" and v.segment.text == "Segment" and v.segment.enabled and v.edit_inputs
    assert not v.next_uncertain and not v.progress_visible
    m.set_inputs(False)
    assert m.state == State.NO_INPUT


def test_outputs_that_cannot_be_written_disable_segment_and_say_why():
    m = ready(model=True)
    m.set_outputs("The confidence output is CT, an input of the job: choose another volume")
    assert not m.view().segment.enabled and m.view().segment.tooltip.startswith("The confidence output is CT")
    assert m.view().train.enabled
    m.set_outputs("")
    assert m.view().segment.enabled


def test_the_scene_closed_notice_stays_when_the_new_scene_has_no_volume():
    m = ready(model=True)
    m.start_training()
    m.abort("The scene was closed while a job ran: the job was cancelled and its results discarded.")
    m.set_inputs(False)
    assert m.state == State.NO_INPUT and m.status.startswith("The scene was closed") and "Choose" in m.status
    m.set_inputs(True, "")
    m.start_training()
    assert "scene was closed" not in m.status


def test_a_cancel_message_from_the_logic_is_shown():
    m = ready(model=False)
    m.start_training()
    m.request_cancel()
    m.finish("cancelled", "Cancelled at step 57: its checkpoint is kept. Press Resume to continue.")
    assert m.status.startswith("Cancelled at step 57") and m.state == State.READY


def test_fill_needs_what_train_needs_writes_where_segment_writes_and_turns_into_cancel():
    m = PanelStateMachine()
    m.set_inputs(True, "Paint the structure on a few slices first")
    assert not m.view().fill.enabled and m.view().fill.tooltip == "Paint the structure on a few slices first"
    m.set_inputs(True, "")
    assert m.view().fill.enabled and not m.view().segment.enabled   # no model needed
    assert "Fill" in m.status
    m.set_outputs("The output segmentation is the one that holds your labels: choose another")
    assert not m.view().fill.enabled and m.view().fill.tooltip.startswith("The output segmentation")
    m.set_outputs("")
    m.start_filling()
    v = m.view()
    assert m.state == State.FILLING and (v.fill.enabled, v.fill.text) == (True, "Cancel")
    assert not v.train.enabled and not v.segment.enabled and not v.edit_inputs and v.progress_visible
    with pytest.raises(TransitionError):
        m.start_training()
    m.request_cancel()
    assert m.state == State.CANCELLING and not m.view().fill.enabled
    m.finish("cancelled")
    assert m.state == State.READY
    m.start_filling()
    m.finish("completed", "Filled CT from 3 painted slice(s)")
    assert m.state == State.COMPLETED and m.view().fill.enabled and m.status.startswith("Filled")
