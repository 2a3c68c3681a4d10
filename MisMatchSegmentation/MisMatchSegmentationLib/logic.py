"""Training and segmentation jobs: MRML nodes in, the engine in a child process, MRML nodes out.

``MisMatchLogic`` holds no Qt object: the panel calls ``poll()`` from a timer and shows what it returns;
tests and scripts call ``wait()``. Events handed out by ``poll()`` are the engine's (docs/contract.md:
``start``, ``progress``, ``log``, ``end``) plus the logic's own:

- ``{"event": "status", "message": ...}``: something the user should read now (e.g. that the engine ran out of GPU
  memory and goes on with smaller batches: the engine's out-of-memory policy, the one there is);
- ``{"event": "output", "lines": [...]}``: what the engine wrote on stdout and stderr since the last poll, every
  line (also in the job's log file, ``log_path``), for the panel's log pane and the Python console;
- ``{"event": "done", "job": "train"|"segment", "status": "completed"|"cancelled"|"failed", "message": ...}``:
  the job is over and its results (model, nodes, plots) are in place; always the last event of a job.

Nothing the user gave is overwritten: outputs go to nodes the logic created (marked with the node attribute
``OUTPUT_ATTRIBUTE``) or to nodes the user picked that are not inputs of the job; a segmentation of the user's
own is filled only with ``SegmentRequest.confirm_overwrite`` (the panel asks first).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from . import jobfolder, modelcard, plots
from .engine import contract
from .jobfolder import JobError
from .process import EngineProcess, engine_command, engine_environment, find_python

METHODS = {"MisMatch": "mismatch", "U-Net": "unet-strong"}  # the strong supervised U-Net (Dice + CE, augmentation)
OUTPUT_ATTRIBUTE = jobfolder.OUTPUT_ATTRIBUTE
KEEP_MODELS = 3          # models kept in the working folder besides the current one
KEEP_LOGS = 20           # job logs kept in the working folder
LOG_LINES = 20000        # lines of the current job's output kept in memory
VIRIDIS = ("vtkMRMLColorTableNodeFileViridis.txt", "vtkMRMLColorTableNodeFileInferno.txt",
           "vtkMRMLColorTableNodeRainbow", "vtkMRMLColorTableNodeGrey")


@dataclass
class TrainingRequest:
    """Everything a training run needs, as nodes and plain values (the panel fills it from its parameter node)."""

    volumes: list                     # scalar volume nodes, one per channel; the first sets the grid
    segmentation: object              # the user's label segmentation (never modified)
    segment_ids: list = field(default_factory=list)  # the segments to learn, in order (empty: all)
    orientation: str = "Axial"        # Axial / Coronal / Sagittal, or a grid axis k / j / i
    held_out: list = field(default_factory=list)     # labelled slices kept for checking calibration
    empty_slices: list = field(default_factory=list)  # slices checked and found without the structure
    method: str = "MisMatch"          # MisMatch or U-Net (or an engine method name)
    # the engine's defaults (mismatch.train.TrainConfig; Testing/slicer/test_defaults.py checks they agree)
    steps: int = 180
    learning_rate: float = 2e-3
    alpha: float = 0.002
    batch_size: int = 4
    patch_size: int = 128
    width: int = 16
    device: str = "auto"
    init_model: Path | None = None    # continue from this model (fine-tune after corrections)
    # with init_model: a warm-start round (the engine's WARM_START: a fifth of the steps at half the learning
    # rate); False: the full schedule of steps and learning rate above
    warm_start: bool = True


@dataclass
class SegmentRequest:
    volumes: list
    model: Path
    device: str = "auto"
    segmentation: object = None       # the user's labels: painted slices guide the segmentation (--labels),
                                      # held-out slices are evaluated against them
    held_out: list = field(default_factory=list)
    empty_slices: list = field(default_factory=list)  # slices checked and found without the structure
    output_segmentation: object = None  # None: a new segmentation node
    confidence_volume: object = None
    disagreement_volume: object = None
    confirm_overwrite: bool = False   # the user agreed to replace the segments of their own output segmentation


class OverwriteNeedsConfirmation(JobError):
    """The output segmentation is one of the user's own, with segments: ask before replacing them."""


@dataclass
class Job:
    kind: str                # "train", "fill" or "segment"
    folder: Path
    request: object
    arguments: list
    process: EngineProcess | None = None
    batch_size: int = 0
    output: Path | None = None
    resume: bool = False     # continue from the checkpoint in ``output`` (--resume)
    log: Path | None = None
    memory_warning: str = ""  # the engine ran out of GPU memory and halved its batches (its log warning)
    # what a segmentation reads back when it ends: the model's card, the held-out slices it evaluates, notes
    card: dict | None = None
    evaluated: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def engine_notes(finished: dict) -> list[str]:
    """The sentences the engine's ``end`` event carries for the user (``notes``: e.g. that an intensity range of
    the image decides a class and how to stop it); none from an engine that writes none."""
    notes = (finished.get("end") or {}).get("notes") or []
    return [str(n) for n in notes] if isinstance(notes, list) else []


def checkpoint_step(output: Path | None) -> int | None:
    """The step of the resumable checkpoint the engine wrote into a model folder when it was cancelled."""
    if output is None:
        return None
    state = Path(output) / "checkpoint" / "state.json"
    if not state.is_file():
        return None
    try:
        return int(json.loads(state.read_text(encoding="utf-8")).get("step", 0))
    except (ValueError, OSError):
        return None


def is_alive(node) -> bool:
    """The node is still in the application's scene (not removed, not closed with its scene)."""
    import slicer

    scene = getattr(slicer, "mrmlScene", None)
    return node is not None and scene is not None and node.GetScene() is scene and bool(scene.IsNodePresent(node))


format_duration = contract.format_duration   # as the engine's progress lines show durations


def describe_progress(event: dict) -> str:
    """Status line for a ``progress`` event: what, how far, the loss, the time left."""
    phase = event.get("phase", "")
    step, total = event.get("step"), event.get("total")
    text = {"train": "Training", "segment": "Segmenting", "load": "Loading", "evaluate": "Evaluating"}.get(
        phase, phase.capitalize())
    unit = "step" if phase == "train" else "slice"
    if step is not None and total:
        text += f": {unit} {step}/{total}"
    if event.get("loss") is not None:
        text += f", loss {event['loss']:.4f}"
    if event.get("eta") is not None:
        text += f", {format_duration(event['eta'])} left"
    return text


def removed_slices(report: dict | None, threshold: float = 0.001, most: int = 3) -> list[int]:
    """Up to ``most`` slices of the report where the engine removed more than ``threshold`` of the slice as
    not connected to the painted structure, the largest removals, in slice order."""
    rows = [r for r in (report or {}).get("uncertain_slices") or []
            if isinstance(r.get("removed_fraction"), (int, float)) and r["removed_fraction"] > threshold]
    rows.sort(key=lambda r: -float(r["removed_fraction"]))
    return sorted(int(r["slice"]) for r in rows[:most])


def structure_goes_on_note(report: dict | None) -> str:
    """What the status line says when the engine followed the structure past the painted slices (the report's
    ``structure_goes_on``: ``{"below": slice, "above": slice}``), e.g. "the segmentation follows the structure
    past your painted slices down to slice 13, where the network alone sees it go on: check it"; "" when it
    did not."""
    ends = (report or {}).get("structure_goes_on") or {}
    parts = [f"{'down' if side == 'below' else 'up'} to slice {int(ends[side])}"
             for side in ("below", "above") if isinstance(ends.get(side), (int, float))]
    if not parts:
        return ""
    return (f"the segmentation follows the structure past your painted slices {' and '.join(parts)}, where the "
            "network alone sees it go on: check it")


def _percent(fraction: float) -> str:
    value = 100.0 * float(fraction)
    return f"{value:.1f} %" if value >= 0.1 or value == 0 else "under 0.1 %"


def next_slice_hint(row: dict, labelled=None) -> str:
    """Why the engine suggests labelling the slice of ``row`` (a row of the report's ``uncertain_slices``):
    how much of it the decoders disagree on (or the model is unsure of, or is expected to get wrong, after the
    report's ranking) and how far it is from the nearest painted slice (``labelled``: the painted slices now;
    without them, the distance the engine measured when it segmented). E.g. "slice 37: the decoders disagree on
    4.1 % of it and it is 12 slices from any painted slice"."""
    s = int(row["slice"])
    reasons = []
    if isinstance(row.get("disagreeing_fraction"), (int, float)) and row["disagreeing_fraction"] > 0:
        reasons.append(f"the decoders disagree on {_percent(row['disagreeing_fraction'])} of it")
    elif isinstance(row.get("uncertain_fraction"), (int, float)) and row["uncertain_fraction"] > 0:
        reasons.append(f"the model is unsure of {_percent(row['uncertain_fraction'])} of it")
    elif isinstance(row.get("disagreement"), (int, float)) and row["disagreement"] > 0:
        reasons.append("the decoders disagree most here")
    if isinstance(row.get("expected_error"), (int, float)) and row["expected_error"] > 0 and \
            str(row.get("ranking", "")).startswith("expected-error"):
        reasons.append(f"about {_percent(row['expected_error'])} of it is expected to be wrong")
    distance = row.get("distance")
    if labelled:
        distance = min(abs(s - int(x)) for x in labelled)
    if isinstance(distance, int) and distance > 0:
        where = "it is next to a painted slice" if distance == 1 else f"it is {distance} slices from any painted slice"
        if row.get("beyond_filled"):   # a fill (no network): the image goes on looking like the painted structure
            reasons.insert(0, f"{where}, past where the fill ends, but the image there still looks like your "
                              "painted structure: paint it, or list it under Empty slices if the structure has ended")
        elif row.get("beyond_prediction"):   # the prior ended the structure before the network does
            reasons.insert(0, f"{where}, past where the segmentation ends, but the network alone still sees the "
                              "structure there: paint it, or list it under Empty slices if the structure has ended")
        elif row.get("structure_goes_on"):   # the segmentation follows the network past the painted slices
            reasons.insert(0, f"{where}, past your painted slices, where the network alone sees the structure go "
                              "on and the segmentation follows it: check it, or list it under Empty slices if the "
                              "structure has ended")
        elif row.get("ranking") == "gap":   # ranked by the gap: that is the reason, the rest a detail
            reasons.insert(0, f"{where}, in the widest unpainted stretch of the structure")
        else:
            reasons.append(where)
    if not reasons:
        return f"slice {s}: the most uncertain of the slices not painted"
    return f"slice {s}: " + (" and ".join(reasons) if len(reasons) <= 2 else
                             ", ".join(reasons[:-1]) + " and " + reasons[-1])


def is_out_of_memory(event: dict) -> bool:
    """Whether an engine event (a log line, or the finished job with its last stderr lines) is about running out of
    GPU memory."""
    text = " ".join([event.get("message") or ""] + list(event.get("stderr") or [])[-5:]).lower()
    return "out of memory" in text


class MisMatchLogic:
    """Runs one job at a time. ``runner``: the class that runs the child (tests put a stand-in there);
    ``python``: the engine's interpreter (default: Slicer's PythonSlicer, or this Python outside Slicer)."""

    def __init__(self, work_dir: str | Path | None = None, python: str | None = None, runner=EngineProcess,
                 command=None, stop_file: bool = True):
        self.work_dir = Path(work_dir) if work_dir else self.default_work_dir()
        self.python = python
        self.runner = runner
        self.command = command  # None: [python, -u, -m, mismatch]; tests give a stand-in command prefix
        # ask the engine to stop through a file in the job folder too (where signals cannot reach it)
        self.stop_file = stop_file
        self.interrupted: Job | None = None  # a cancelled training whose checkpoint is kept (resume_training)
        self.log_lines: list[str] = []
        self.log_path: Path | None = None
        self._abandoned: list[Job] = []
        self.job: Job | None = None
        self.current_model: Path | None = None
        self.report: dict | None = None
        self.report_axis: str = "k"
        self.loss_curve = plots.LossCurve()
        self.status: str = ""
        self.fraction: float = 0.0
        self.note: str = ""
        self.results: dict = {}
        self._visited: list[int] = []
        self.next_hint: str = ""       # why the last slice of next_uncertain_slice was chosen

    # -- setup ------------------------------------------------------------------------------------------
    @staticmethod
    def default_work_dir() -> Path:
        import slicer

        base = getattr(getattr(slicer, "app", None), "temporaryPath", None) or tempfile.gettempdir()
        return Path(base) / "MisMatch"

    def _new_folder(self, kind: str) -> Path:
        folder = self.work_dir / "jobs" / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        folder.mkdir(parents=True)
        return folder

    def _command(self, arguments: list[str]) -> list[str]:
        if self.command is not None:
            return list(self.command) + arguments
        return engine_command(arguments, self.python or find_python())

    @property
    def running(self) -> bool:
        return self.job is not None

    @property
    def busy(self) -> bool:
        """A job runs, or a job abandoned at scene close has not stopped yet (keep polling)."""
        return self.job is not None or bool(self._abandoned)

    # -- training ---------------------------------------------------------------------------------------
    @staticmethod
    def _check_painting(request: TrainingRequest) -> None:
        if not request.volumes or request.volumes[0] is None:
            raise JobError("choose the input volume")
        if request.segmentation is None:
            raise JobError("choose the segmentation with your labels")

    def _write_painting(self, kind: str, request: TrainingRequest):
        """A new job folder with the images, the painted labels and their classes (``write_training_inputs``):
        ``(folder, files, slice axis)``; the folder is removed again when writing fails."""
        segmentation = request.segmentation.GetSegmentation()
        segment_ids = list(request.segment_ids) or [segmentation.GetNthSegmentID(n)
                                                    for n in range(segmentation.GetNumberOfSegments())]
        axis = jobfolder.axis_for_orientation(request.volumes[0], request.orientation)
        folder = self._new_folder(kind)
        try:
            files = jobfolder.write_training_inputs(folder, request.volumes, request.segmentation, segment_ids,
                                                    axis, request.held_out, request.empty_slices)
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return folder, files, axis

    def start_training(self, request: TrainingRequest) -> Job:
        if self.job is not None:
            raise JobError("a job is already running: wait for it or cancel it")
        self._drain_abandoned()
        self._check_painting(request)
        init = Path(request.init_model) if request.init_model else None
        if init is not None:
            card = modelcard.read_card(init)
            if modelcard.channel_count(card) != len(request.volumes):
                raise JobError(f"the model to continue from takes {modelcard.channel_count(card)} channel(s), "
                               f"but {len(request.volumes)} volume(s) are chosen")
        jobfolder.check_not_constant(request.volumes)   # fill works on any image; training needs one to learn from
        folder, files, axis = self._write_painting("train", request)
        output = self.work_dir / "models" / folder.name.replace("train-", "model-")
        arguments = ["train", *map(str, files.images), "--labels", str(files.labels), "--out", str(output),
                     "--classes", str(files.classes), "--axis", axis,
                     "--labelled-slices", jobfolder.format_slices(files.labelled),
                     "--method", METHODS.get(request.method, request.method),
                     "--steps", str(int(request.steps)), "--lr", repr(float(request.learning_rate)),
                     "--alpha", repr(float(request.alpha)), "--width", str(int(request.width)),
                     "--patch-size", str(int(request.patch_size)), "--device", request.device or "auto",
                     "--events", "-"]
        if files.empty:
            arguments += ["--empty-slices", jobfolder.format_slices(files.empty)]
        if init is not None:
            arguments += ["--init", str(init)]
            if not request.warm_start:
                arguments += ["--no-warm-start"]
        job = Job("train", folder, request, arguments, batch_size=max(1, int(request.batch_size)), output=output)
        self.discard_interrupted()  # a new training starts over
        self.loss_curve.reset()
        self.note = ""
        self._start(job)
        return job

    # -- fill: the painted slices alone, before any training ----------------------------------------------
    def start_filling(self, request: TrainingRequest, output_segmentation=None, confirm_overwrite: bool = False) -> Job:
        """Fill the unpainted slices from the painted ones with the engine's ``fill`` (the prior alone: the
        painted shapes, the image's edges, the painted intensities; no network, seconds) into
        ``output_segmentation`` (None: a new segmentation node), under the same rules as Segment's outputs."""
        if self.job is not None:
            raise JobError("a job is already running: wait for it or cancel it")
        self._drain_abandoned()
        outputs = SegmentRequest(volumes=list(request.volumes), model=None, segmentation=request.segmentation,
                                 output_segmentation=output_segmentation, confirm_overwrite=confirm_overwrite)
        check_outputs(outputs)  # before anything else: never a step towards overwriting the user's data
        self._check_painting(request)
        folder, files, axis = self._write_painting("fill", request)
        classes = json.loads(files.classes.read_text(encoding="utf-8"))
        arguments = ["fill", *map(str, files.images), "--labels", str(files.labels),
                     "--out", str(folder / "segmentation.nrrd"), "--report", str(folder / "report.json"),
                     "--classes", str(files.classes), "--axis", axis,
                     "--labelled-slices", jobfolder.format_slices(files.labelled), "--events", "-"]
        if files.empty:
            arguments += ["--empty-slices", jobfolder.format_slices(files.empty)]
        job = Job("fill", folder, outputs, arguments, card={"classes": classes, "painted": list(files.labelled)})
        self._start(job)
        return job

    @staticmethod
    def _import_segmentation(job: Job, doing: str):
        """The job's label map into its output segmentation (a new node for none): ``(input volume, its name,
        segmentation node)``. The input volume must still be in the scene; an output node removed meanwhile is
        replaced by a new one, and the output checks run again on what is left."""
        request: SegmentRequest = job.request
        reference = request.volumes[0]
        if not is_alive(reference):
            raise JobError(f"the input volume was removed from the scene while {doing}: nothing was imported")
        for key in ("output_segmentation", "confidence_volume", "disagreement_volume"):
            if getattr(request, key) is not None and not is_alive(getattr(request, key)):
                setattr(request, key, None)
        check_outputs(request)
        name = reference.GetName()
        seg = jobfolder.import_segmentation(job.folder / "segmentation.nrrd", reference, job.card["classes"],
                                            request.output_segmentation, name=f"{name} MisMatch segmentation")
        seg.SetAttribute(OUTPUT_ATTRIBUTE, "segmentation")
        return reference, name, seg

    def _fill_done(self, job: Job, finished: dict) -> str:
        _, name, seg = self._import_segmentation(job, "filling")
        report = job.folder / "report.json"   # the slices worth painting next; an older engine writes none
        self.report = json.loads(report.read_text(encoding="utf-8")) if report.is_file() else None
        self.report_axis = (self.report or {}).get("slice_axis") or "k"
        self._visited = []
        self.results = {"segmentation": seg}
        painted = job.card["painted"]
        text = f"Filled {name} from {len(painted)} painted slice(s)"
        elapsed = (finished.get("end") or {}).get("elapsed")
        if elapsed is not None:
            text += f" in {format_duration(elapsed)}"
        text += (" (no network: the painted shapes, the image's edges and intensities). Train, then Segment, for "
                 "a model's segmentation: better on tumours and thin structures")
        for note in engine_notes(finished):
            text += f"; {note}"
        ranked = (self.report or {}).get("uncertain_slices")
        if ranked:
            text += f". Label next: {next_slice_hint(dict(ranked[0], ranking='gap'))} (Next uncertain slice goes there)"
        return text + "."

    # -- segmentation -----------------------------------------------------------------------------------
    def start_segmenting(self, request: SegmentRequest) -> Job:
        if self.job is not None:
            raise JobError("a job is already running: wait for it or cancel it")
        self._drain_abandoned()
        check_outputs(request)  # before anything else: never a step towards overwriting the user's data
        if request.model is None:
            raise JobError("train a model, or load one, first")
        card = modelcard.read_card(request.model)
        if modelcard.channel_count(card) != len(request.volumes):
            raise JobError(f"the model takes {modelcard.channel_count(card)} channel(s), but "
                           f"{len(request.volumes)} volume(s) are chosen")
        folder = self._new_folder("segment")
        try:
            images = jobfolder.write_images(request.volumes, folder)
            arguments = ["segment", *map(str, images), "--model", str(request.model),
                         "--out", str(folder / "segmentation.nrrd"), "--confidence", str(folder / "confidence.nrrd"),
                         "--disagreement", str(folder / "disagreement.nrrd"), "--report", str(folder / "report.json"),
                         "--device", request.device or "auto", "--events", "-"]
            held_out = sorted(set(request.held_out or []))
            evaluated: list[int] = []
            notes: list[str] = []
            if request.segmentation is not None:
                axis = card.get("slice_axis", "k")
                user = jobfolder.labels_for_classes(request.segmentation, card["classes"], request.volumes[0])
                if user is None:
                    notes.append("your segmentation has no segment named like the model's classes: segmented "
                                 "without your painted slices")
                else:
                    arguments += self._painted_arguments(folder, request, card, user, axis, held_out, notes)
                    evaluated = [s for s in held_out if s in jobfolder.labelled_slices(user, axis)]
                if evaluated:
                    jobfolder.write_labelmap(jobfolder.keep_slices(user, axis, evaluated), request.volumes[0],
                                             folder / "truth.nrrd")
                    arguments += ["--truth", str(folder / "truth.nrrd"),
                                  "--eval-slices", jobfolder.format_slices(evaluated)]
            if "--labels" not in arguments:   # the panel's painting decides, not the one the model folder keeps
                arguments.append("--no-labels")
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        job = Job("segment", folder, request, arguments, card=card, evaluated=evaluated, notes=notes)
        self._start(job)
        return job

    @staticmethod
    def _painted_arguments(folder: Path, request: SegmentRequest, card: dict, user, axis: str, held_out: list,
                           notes: list) -> list[str]:
        """Write ``painted.nrrd`` (the user's painted labels as the model's class values, held-out slices
        removed) and return ``--labels`` (and ``--empty-slices``) for the engine, or nothing (with a note
        saying why) when no painted slice is left to guide the segmentation."""
        classes = card["classes"]
        empty = jobfolder.check_empty_slices(user, axis, request.empty_slices, held_out,
                                             {int(c["value"]): str(c.get("name", "")) for c in classes})
        painted = [s for s in jobfolder.labelled_slices(user, axis) if s not in held_out]
        if not painted:
            notes.append("your segmentation has no painted slice outside the held-out ones: segmented without "
                         "your painted slices")
            return []
        segmentation = request.segmentation.GetSegmentation()
        missing = [str(c.get("name", "")) for c in classes
                   if not segmentation.GetSegmentIdBySegmentName(str(c.get("name", "")))]
        if missing:
            notes.append(f"no segment of your segmentation is named {', '.join(missing)}: on your painted slices "
                         "the model's class(es) of that name count as absent")
        path = jobfolder.write_labelmap(jobfolder.keep_slices(user, axis, painted), request.volumes[0],
                                        folder / "painted.nrrd")
        arguments = ["--labels", str(path)]
        if empty:
            arguments += ["--empty-slices", jobfolder.format_slices(empty)]
        return arguments

    # -- running ----------------------------------------------------------------------------------------
    def _start(self, job: Job) -> None:
        arguments = list(job.arguments)
        stop_file = None
        if job.kind == "train":
            arguments += ["--batch-size", str(job.batch_size)]
            if job.resume:
                arguments.append("--resume")
            elif job.output is not None and job.output.exists():
                shutil.rmtree(job.output, ignore_errors=True)
            if self.stop_file:
                stop_file = job.folder / "STOP"
                stop_file.unlink(missing_ok=True)
                arguments += ["--stop-file", str(stop_file)]
        logs = self.work_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        job.log = logs / f"{job.folder.name}.log"
        with open(job.log, "a", encoding="utf-8") as f:
            f.write("$ " + " ".join(self._command(arguments)) + "\n")
        self.log_path, self.log_lines = job.log, []
        prune(logs, KEEP_LOGS, keep=[job.log])
        job.process = self.runner(self._command(arguments), env=engine_environment(), cwd=str(job.folder),
                                  stop_file=stop_file, log_file=job.log)
        self.job, self.fraction = job, 0.0
        self.status = {"train": "Training", "fill": "Filling"}.get(job.kind, "Segmenting") + ": starting the engine..."
        job.process.start()

    def cancel(self) -> None:
        if self.job is not None and self.job.process is not None:
            self.job.process.cancel()
            self.status = "Cancelling: waiting for the engine to stop..."

    def abandon(self) -> None:
        """The scene is closing: cancel the running job and forget it (whatever it produces is thrown away once
        the engine has stopped, see ``busy``), and forget everything that belonged to the scene: the report,
        the uncertain-slice ranking and the slices visited, the result nodes, the loss curve's nodes and the
        interrupted run. The current model is kept (it is a file, not scene data)."""
        job = self.job
        if job is not None:
            if job.process is not None:
                job.process.cancel()
            self._abandoned.append(job)
            self.job = None
        self.discard_interrupted()
        self.report, self._visited, self.results = None, [], {}
        self.status, self.fraction, self.note = "", 0.0, ""
        self.loss_curve = plots.LossCurve()

    def _drain_abandoned(self) -> None:
        for job in list(self._abandoned):
            events = job.process.poll() if job.process is not None else [{"event": "finished"}]
            if job.process is None or any(e.get("event") == "finished" for e in events) or not job.process.running:
                self._abandoned.remove(job)
                self._clean(job, keep_model=False)

    def shutdown(self) -> None:
        """The application is quitting (or the module is going away): kill every engine tree now."""
        for job in [self.job] + list(self._abandoned):
            if job is not None and job.process is not None:
                job.process.kill()

    def discard_interrupted(self) -> None:
        job, self.interrupted = self.interrupted, None
        if job is not None:
            self._clean(job, keep_model=False)

    def resume_training(self) -> Job:
        """Continue the cancelled training from its checkpoint (same inputs, ``--resume``)."""
        if self.job is not None:
            raise JobError("a job is already running: wait for it or cancel it")
        job = self.interrupted
        if job is None or checkpoint_step(job.output) is None or not job.folder.is_dir():
            self.discard_interrupted()
            raise JobError("there is no interrupted training to resume: press Train")
        self.interrupted = None
        job.resume = True  # the batch sizes are the checkpoint's
        self.note = ""
        self._start(job)
        return job

    def poll(self) -> list[dict]:
        """Events since the last call; results are read into MRML nodes when the job's ``finished`` arrives."""
        if self._abandoned:
            self._drain_abandoned()
        job = self.job
        if job is None or job.process is None:
            return []
        out: list[dict] = []
        lines = [line for _, line in job.process.take_output()] if hasattr(job.process, "take_output") else []
        if lines:
            self.log_lines.extend(lines)
            del self.log_lines[:-LOG_LINES]
            out.append({"event": "output", "lines": lines})
        loss_changed = False
        for event in job.process.poll():
            kind = event.get("event")
            if kind == "progress":
                if event.get("total"):
                    self.fraction = min(1.0, float(event.get("step") or 0) / float(event["total"]))
                self.status = (self.note + describe_progress(event)) if job.kind == "train" else describe_progress(event)
                if job.kind == "train":
                    self.loss_curve.add(event)
                    loss_changed = True
            elif kind == "start" and event.get("phase") in ("train", "segment"):
                self.status = self.note + describe_progress(event)
            elif kind == "finished":
                out.extend(self._finish(job, event))
                continue
            elif kind == "log" and job.kind == "train" and is_out_of_memory(event):
                # the engine halves its batches and goes on (its one out-of-memory policy): say so
                job.memory_warning = str(event.get("message") or "")
                self.note = "(smaller batches after a GPU out-of-memory) "
                out.append(event)
                out.append({"event": "status", "message": job.memory_warning[:1].upper() + job.memory_warning[1:] + "."})
                continue
            out.append(event)
        if loss_changed:
            self.loss_curve.update_nodes()
        return out

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> list[dict]:
        """Poll until the job (including an out-of-memory retry) is over. For tests and scripts."""
        deadline = None if timeout is None else time.monotonic() + timeout
        events: list[dict] = []
        while self.job is not None:
            events += self.poll()
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise TimeoutError(f"the MisMatch job did not finish within {timeout} s")
            time.sleep(interval)
        return events

    def _finish(self, job: Job, finished: dict) -> list[dict]:
        status, message = finished["status"], finished.get("message") or ""
        self.job = None
        self.fraction = 1.0 if status == "completed" else self.fraction
        late = [line for _, line in job.process.take_output()] if hasattr(job.process, "take_output") else []
        self.log_lines.extend(late)
        events = [{"event": "output", "lines": late}] if late else []
        keep_checkpoint = False
        try:
            if status == "completed":
                done = {"train": self._train_done, "fill": self._fill_done, "segment": self._segment_done}
                message = done[job.kind](job, finished)
            elif status == "cancelled":
                step = checkpoint_step(job.output) if job.kind == "train" else None
                if step is not None:
                    keep_checkpoint = True
                    self.interrupted = job
                    message = (f"Cancelled at step {step}: its checkpoint is kept. Press Resume to continue "
                               "training from it, or Train to start again.")
                else:
                    message = "Cancelled." + (" The previous model is kept."
                                              if job.kind == "train" and self.current_model else "")
            else:
                message = self._failure_text(job, finished)
        except Exception as exc:  # reading results back failed: the panel must stay usable
            status, message = "failed", f"reading the results failed: {exc}"
            if job.log is not None:
                message += f". Full log: {job.log}"
        finally:
            if not keep_checkpoint:
                self._clean(job, keep_model=(status == "completed"))
        if status == "completed" and job.kind == "train":
            self.prune_models()
        self.status = message
        return events + [{"event": "done", "job": job.kind, "status": status, "message": message}]

    def _failure_text(self, job: Job, finished: dict) -> str:
        message = finished.get("message") or "the engine stopped without a message"
        if is_out_of_memory(finished):   # the engine halved its batches down to one slice first
            return f"GPU out of memory: lower the patch size or the width, or train on the CPU ({message})"
        if finished.get("returncode") == 2:
            return f"{message} (fix the input and try again)"
        errors = [line for line in finished.get("stderr") or [] if line.strip()]
        last = next((line for line in reversed(errors) if "error" in line.lower() or "exception" in line.lower()),
                    errors[-1] if errors else "")
        text = message if not last or last in message else f"{message}: {last}"
        where = f"the Log section below and {job.log}" if job.log is not None else "the Log section below"
        return f"{text}. The engine's full output is in {where} (and in the Python console)"

    def _clean(self, job: Job, keep_model: bool) -> None:
        shutil.rmtree(job.folder, ignore_errors=True)
        if job.kind == "train" and not keep_model and job.output is not None:
            shutil.rmtree(job.output, ignore_errors=True)

    def prune_models(self, keep: int = KEEP_MODELS) -> list[Path]:
        """Remove old models from the working folder: the current one, the one an interrupted or running
        training writes, and the ``keep`` newest others stay. Returns what was removed."""
        protected = [m for m in (self.current_model, getattr(self.interrupted, "output", None),
                                 getattr(self.job, "output", None)) if m is not None]
        return prune(self.work_dir / "models", keep, keep=protected)

    def _train_done(self, job: Job, finished: dict) -> str:
        card = modelcard.read_card(job.output)
        self.current_model = job.output
        losses = (finished.get("end") or {}).get("final_losses") or card.get("summary", {}).get("final_losses") or {}
        elapsed = (finished.get("end") or {}).get("elapsed")
        text = f"Trained {card.get('summary', {}).get('steps', '?')} steps in {format_duration(elapsed)}"
        if losses.get("loss") is not None:
            text += f" (final loss {losses['loss']:.4f})"
        if job.memory_warning:
            text += f" after a GPU out-of-memory ({job.memory_warning})"
        return text + ". Press Segment."

    def _segment_done(self, job: Job, finished: dict) -> str:
        request: SegmentRequest = job.request
        card = job.card
        reference, name, seg = self._import_segmentation(job, "segmenting")
        confidence = jobfolder.read_volume_on_grid(job.folder / "confidence.nrrd", reference, request.confidence_volume)
        if request.confidence_volume is None:
            confidence.SetName(f"{name} MisMatch confidence")
        disagreement = jobfolder.read_volume_on_grid(job.folder / "disagreement.nrrd", reference,
                                                     request.disagreement_volume)
        if request.disagreement_volume is None:
            disagreement.SetName(f"{name} MisMatch disagreement")
        confidence.SetAttribute(OUTPUT_ATTRIBUTE, "confidence")
        disagreement.SetAttribute(OUTPUT_ATTRIBUTE, "disagreement")
        _colour_volume(confidence, (0.0, 1.0))
        _colour_volume(disagreement, None)
        self.report = json.loads((job.folder / "report.json").read_text(encoding="utf-8"))
        self.report_axis = self.report.get("slice_axis") or card.get("slice_axis", "k")
        self._visited = []
        self.results = {"segmentation": seg, "confidence": confidence, "disagreement": disagreement}
        evaluation = self.report.get("evaluation")
        text = f"Segmented {name}"
        elapsed = (finished.get("end") or {}).get("elapsed")
        if elapsed is not None:
            text += f" in {format_duration(elapsed)}"
        if evaluation:
            chart = plots.reliability_diagram(evaluation, job.evaluated)
            self.results["reliability"] = chart
            ece = plots.ece_of(evaluation)
            if ece is not None:
                text += f"; ECE on held-out slices {jobfolder.format_slices(job.evaluated)}: {ece:.3f}"
        elif request.held_out:
            text += "; the held-out slices hold none of the model's classes, so there is no reliability diagram"
        for note in job.notes + engine_notes(finished):
            text += f"; {note}"
        removed = removed_slices(self.report)
        if removed:
            where = ("slice " if len(removed) == 1 else "slices ") + ", ".join(map(str, removed))
            text += f"; the model also drew parts away from your structure on {where}: they were removed; check them"
        goes_on = structure_goes_on_note(self.report)
        if goes_on:
            text += f"; {goes_on}"
        ranked = self.report.get("uncertain_slices")
        if ranked:
            first = dict(ranked[0], ranking=self.report.get("ranking", ""))
            text += (f". Label next: {next_slice_hint(first)} (Next uncertain slice goes there and on down the "
                     "ranking)")
        return text + "."

    # -- after segmenting -------------------------------------------------------------------------------
    def next_uncertain_slice(self, volume, segmentation=None, segment_ids=None, jump: bool = True):
        """The unlabelled slice where the decoders disagree most that was not shown yet: ``(slice, ras)``,
        or None, with ``ras`` in world coordinates (the volume's parent transforms applied). Slices the user has
        labelled (also since segmenting) are skipped; after the last one the ranking starts again. ``jump``:
        centre every slice view on it."""
        if not self.report or not self.report.get("uncertain_slices"):
            return None
        axis = self.report_axis
        labelled: set[int] = set()
        if segmentation is not None:
            ids = list(segment_ids or []) or [segmentation.GetSegmentation().GetNthSegmentID(n)
                                              for n in range(segmentation.GetSegmentation().GetNumberOfSegments())]
            if ids:
                labels = jobfolder.labels_from_segments(segmentation, ids, volume)
                labelled = set(jobfolder.labelled_slices(labels, axis))
        ranked = [int(u["slice"]) for u in self.report["uncertain_slices"] if int(u["slice"]) not in labelled]
        if not ranked:
            return None
        fresh = [s for s in ranked if s not in self._visited]
        if not fresh:
            self._visited, fresh = [], ranked
        chosen = fresh[0]
        self._visited.append(chosen)
        row = next(u for u in self.report["uncertain_slices"] if int(u["slice"]) == chosen)
        self.next_hint = next_slice_hint(dict(row, ranking=self.report.get("ranking", "")), sorted(labelled))
        ras = jobfolder.local_to_world(volume, jobfolder.slice_centre_ras(volume, axis, chosen))
        if jump:
            jump_slice_views(ras)
        return chosen, ras

    # -- models -----------------------------------------------------------------------------------------
    def load_model(self, folder: str | Path) -> dict:
        """Validate a model folder, copy it into the working folder and make it the current model."""
        card = modelcard.read_card(folder)
        destination = self.work_dir / "models" / f"imported-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        modelcard.copy_model(folder, destination)
        self.current_model = destination
        self.prune_models()
        return card

    def save_model(self, destination: str | Path) -> Path:
        if self.current_model is None:
            raise JobError("there is no model to save yet: train one first")
        return modelcard.copy_model(self.current_model, destination)


def prune(folder: Path, newest: int, keep=()) -> list[Path]:
    """Remove the entries of ``folder`` except those in ``keep`` and the ``newest`` others (by modification
    time). Returns what was removed."""
    if not folder.is_dir():
        return []
    kept = {Path(k).resolve() for k in keep}
    others = [p for p in folder.iterdir() if p.resolve() not in kept]
    others.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    removed = []
    for path in others[max(0, newest):]:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def check_outputs(request: SegmentRequest) -> None:
    """Outputs go to nodes the module made, or to nodes the user picked that are not inputs of the job; a
    segmentation of the user's own that holds segments needs ``confirm_overwrite``. Raises :class:`JobError`
    (or :class:`OverwriteNeedsConfirmation`) saying what to choose instead."""
    inputs = [v for v in request.volumes if v is not None]
    ids = {v.GetID() for v in inputs if v.GetID()}

    def is_input(node) -> bool:
        return any(node is v for v in inputs) or (node.GetID() is not None and node.GetID() in ids)

    for key, what in (("confidence_volume", "confidence"), ("disagreement_volume", "disagreement")):
        node = getattr(request, key)
        if node is not None and is_input(node):
            raise JobError(f"the {what} output is {node.GetName()}, an input of this job, whose voxels would be "
                           f"replaced: choose another {what} volume, or none to create a new one")
    if (request.confidence_volume is not None and request.disagreement_volume is not None
            and request.confidence_volume is request.disagreement_volume):
        raise JobError("the confidence and disagreement outputs are the same volume: choose two different volumes, "
                       "or none to create new ones")
    seg = request.output_segmentation
    if seg is None:
        return
    if request.segmentation is not None and (seg is request.segmentation or seg.GetID() == request.segmentation.GetID()):
        raise JobError("the output segmentation is the one that holds your labels: choose another output "
                       "segmentation, or none to create a new one")
    count = seg.GetSegmentation().GetNumberOfSegments()
    if count and not seg.GetAttribute(OUTPUT_ATTRIBUTE) and not request.confirm_overwrite:
        raise OverwriteNeedsConfirmation(
            f"the output segmentation {seg.GetName()} holds {count} segment(s) of your own, which segmenting would "
            "replace: confirm, or choose none to create a new segmentation")


def _colour_volume(node, window) -> None:
    import slicer

    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    scene = slicer.mrmlScene
    for colour_id in VIRIDIS:
        if scene.GetNodeByID(colour_id) is not None:
            display.SetAndObserveColorNodeID(colour_id)
            break
    if window is not None:
        display.SetAutoWindowLevel(False)
        display.SetWindowLevelMinMax(*window)


def jump_slice_views(ras) -> None:
    """Centre every slice view of the scene on ``ras``."""
    import slicer

    slicer.vtkMRMLSliceNode.JumpAllSlices(slicer.mrmlScene, float(ras[0]), float(ras[1]), float(ras[2]),
                                          slicer.vtkMRMLSliceNode.CenteredJumpSlice)
