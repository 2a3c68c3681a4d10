"""The panel's state machine, in plain Python (no Qt): which actions are enabled in which state, and what
each event does. The widget only copies :meth:`PanelStateMachine.view` onto its buttons.

States::

    no-input ──volume chosen──▶ ready ──Train──▶ training ──finished──▶ completed | failed
                                  │                 │ Cancel
                                  ├──Segment──▶ segmenting ──Cancel──▶ cancelling ──finished──▶ ready
                                  └──Fill──▶ filling (the same, seconds)

``completed`` and ``failed`` behave like ``ready`` (everything that is possible is enabled again); they only
keep the last outcome in the status line. Train, Fill and Segment turn into Cancel while their job runs. Fill
needs what Train needs (painted labels) and writes where Segment writes (the output segmentation). A training
cancelled after its checkpoint was written can be resumed (``set_checkpoint``); the scene closing while a job
runs puts the panel back to idle at once (``abort``), whatever the engine is still doing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class State(str, enum.Enum):
    NO_INPUT = "no-input"
    READY = "ready"
    TRAINING = "training"
    SEGMENTING = "segmenting"
    FILLING = "filling"
    CANCELLING = "cancelling"
    FAILED = "failed"
    COMPLETED = "completed"


RUNNING = (State.TRAINING, State.SEGMENTING, State.FILLING, State.CANCELLING)
IDLE = (State.READY, State.FAILED, State.COMPLETED)


@dataclass(frozen=True)
class Button:
    enabled: bool
    text: str
    tooltip: str = ""


@dataclass(frozen=True)
class PanelView:
    """What the widget shows: the three main buttons, the other actions, and the status line."""

    state: State
    train: Button
    segment: Button
    fill: Button
    next_uncertain: bool
    resume: bool
    save_model: bool
    import_model: bool
    edit_inputs: bool
    progress_visible: bool
    status: str


class TransitionError(RuntimeError):
    """An action that the current state does not allow (the widget should never offer it)."""


@dataclass
class PanelStateMachine:
    state: State = State.NO_INPUT
    has_volume: bool = False
    labels_reason: str = "choose the segmentation with your labels"  # empty when training is possible
    has_model: bool = False
    has_uncertainty: bool = False
    has_checkpoint: bool = False     # a cancelled training whose checkpoint can be resumed
    outputs_reason: str = ""         # why the chosen outputs cannot be written ("" when they can)
    notice: str = ""                 # what happened to an aborted job, kept in the status until a job starts
    status: str = "Choose the input volume."
    listeners: list = field(default_factory=list)

    # -- facts about the inputs -------------------------------------------------------------------------
    def set_inputs(self, has_volume: bool, labels_reason: str = "") -> None:
        """``labels_reason``: why training is not possible yet ("" when it is)."""
        self.has_volume, self.labels_reason = bool(has_volume), labels_reason
        if self.state in RUNNING:
            self._changed()
            return
        if not self.has_volume:
            self.state, self.status = State.NO_INPUT, self._with_notice("Choose the input volume.")
        elif self.state == State.NO_INPUT:
            self.state = State.READY
            self.status = self._ready_status()
        elif self.state == State.READY:
            self.status = self._ready_status()
        self._changed()

    def set_model(self, has_model: bool) -> None:
        self.has_model = bool(has_model)
        if self.state == State.READY:
            self.status = self._ready_status()
        self._changed()

    def set_uncertainty(self, available: bool) -> None:
        self.has_uncertainty = bool(available)
        self._changed()

    def set_checkpoint(self, available: bool) -> None:
        self.has_checkpoint = bool(available)
        self._changed()

    def set_outputs(self, reason: str = "") -> None:
        """``reason``: why Segment cannot write into the chosen output nodes ("" when it can)."""
        self.outputs_reason = reason
        self._changed()

    def abort(self, status: str) -> None:
        """The scene was closed: whatever ran is abandoned; back to idle with a fresh start."""
        self.has_uncertainty = self.has_checkpoint = False
        self.state = State.READY if self.has_volume else State.NO_INPUT
        self.status = self.notice = status
        self._changed()

    # -- jobs -------------------------------------------------------------------------------------------
    def start_training(self, resume: bool = False) -> None:
        allowed = self.view().resume if resume else self.view().train.enabled
        if not allowed or self.state in RUNNING:
            raise TransitionError(f"cannot train in state {self.state.value}: {self._train_reason()}")
        self.has_checkpoint, self.notice = False, ""
        self.state = State.TRAINING
        self.status = "Training: resuming from the checkpoint..." if resume else "Training: starting the engine..."
        self._changed()

    def start_segmenting(self) -> None:
        if not self.view().segment.enabled or self.state in RUNNING:
            raise TransitionError(f"cannot segment in state {self.state.value}: {self._segment_reason()}")
        self.state, self.status, self.notice = State.SEGMENTING, "Segmenting: starting the engine...", ""
        self._changed()

    def start_filling(self) -> None:
        if not self.view().fill.enabled or self.state in RUNNING:
            raise TransitionError(f"cannot fill in state {self.state.value}: {self._fill_reason()}")
        self.state, self.status, self.notice = State.FILLING, "Filling: starting the engine...", ""
        self._changed()

    def request_cancel(self) -> None:
        if self.state not in (State.TRAINING, State.SEGMENTING, State.FILLING):
            raise TransitionError(f"nothing to cancel in state {self.state.value}")
        self.state, self.status = State.CANCELLING, "Cancelling: waiting for the engine to stop..."
        self._changed()

    def report(self, status: str) -> None:
        """A progress or log line while a job runs (or any message while idle)."""
        self.status = status
        self._changed()

    def finish(self, status: str, message: str = "") -> None:
        """The job ended: ``status`` is the ``finished`` event's (completed, cancelled or failed)."""
        if self.state not in RUNNING:
            raise TransitionError(f"no job is running (state {self.state.value})")
        if status == "completed":
            self.state, self.status = State.COMPLETED, message or "Done."
        elif status == "cancelled":
            self.state = State.READY if self.has_volume else State.NO_INPUT
            if message.startswith("Cancelled") and message.rstrip(".") != "Cancelled":  # the logic's own sentence,
                # e.g. where the checkpoint is and how to resume
                self.status = message
            else:
                self.status = "Cancelled. " + (self._ready_status() if self.has_volume else "")
        else:
            self.state = State.FAILED
            self.status = "Failed: " + (message or "the engine stopped without a message.")
        if not self.has_volume and self.state != State.FAILED:
            self.state = State.NO_INPUT
        self._changed()

    # -- what the panel shows ---------------------------------------------------------------------------
    def view(self) -> PanelView:
        s = self.state
        idle = s in IDLE

        def button(running: State, stop: str, text: str, reason: str, does: str) -> Button:
            """An action's button: Cancel while its job runs, disabled while any job stops, else enabled when
            idle and nothing is missing (the tooltip says what is, or what the action does)."""
            if s == running:
                return Button(True, "Cancel", stop)
            if s == State.CANCELLING:
                return Button(False, "Cancelling...", "Waiting for the engine to stop")
            return Button(idle and not reason, text, reason or does)

        train = button(State.TRAINING, "Stop training at the end of the current step; its checkpoint is kept and "
                                       "Resume continues from it", "Train", self._train_reason(),
                       "Train on the labelled slices in the background")
        segment = button(State.SEGMENTING, "Stop segmenting", "Segment", self._segment_reason(),
                         "Segment the whole volume with the model")
        fill = button(State.FILLING, "Stop filling", "Fill", self._fill_reason(),
                      "Fill the unpainted slices from the painted ones in seconds, before any training: the painted "
                      "shapes follow the image's edges and intensities (no network). Train, then Segment, does "
                      "better on tumours and thin structures")
        return PanelView(
            state=s, train=train, segment=segment, fill=fill,
            next_uncertain=idle and self.has_uncertainty,
            resume=(idle or s == State.NO_INPUT) and self.has_checkpoint,
            save_model=idle and self.has_model,
            import_model=s in IDLE or s == State.NO_INPUT,
            edit_inputs=s not in RUNNING,
            progress_visible=s in RUNNING,
            status=self.status,
        )

    def _train_reason(self) -> str:
        if not self.has_volume:
            return "Choose the input volume first"
        return self.labels_reason

    def _fill_reason(self) -> str:
        return self._train_reason() or self.outputs_reason

    def _segment_reason(self) -> str:
        if not self.has_volume:
            return "Choose the input volume first"
        if not self.has_model:
            return "Train a model, or load one, first"
        return self.outputs_reason

    def _with_notice(self, text: str) -> str:
        return f"{self.notice} {text}" if self.notice else text

    def _ready_status(self) -> str:
        if self.labels_reason and not self.has_model:
            text = f"Ready: {self.labels_reason[0].lower()}{self.labels_reason[1:]}."
        elif self.has_model:
            text = "Ready: press Train to (re)train, or Segment to segment the volume."
        else:
            text = "Ready: press Fill for a first segmentation in seconds (no network), or Train for a model."
        return self._with_notice(text)

    def _changed(self) -> None:
        view = self.view()
        for listener in list(self.listeners):
            listener(view)
