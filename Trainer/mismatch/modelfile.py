"""Model folders: weights in safetensors and a JSON card; resumable checkpoints. No pickle is ever loaded.

A model folder holds ``model.json`` (the card, see ``docs/contract.md``) and ``model.safetensors``. The
safetensors file holds one set of weights per kept snapshot, keys prefixed ``snapshot<n>.``; the card
records the file's sha256, checked before anything is loaded. ``optimizer.safetensors``, when there, holds
the optimiser's state at the end of training, which a warm start (``mismatch train --init``) continues from.
``painted.safetensors``, when there, holds the painted slices the model was trained from (the label values on
them, and a fingerprint of the image there), so that ``mismatch segment`` of that same image keeps them and lets
them guide the other slices without being given ``--labels`` again (:func:`read_painted`).

Both a model folder and a checkpoint folder are written as one unit (:func:`mismatch.io.replace_folder`): the
new folder is built beside the old one and swapped in by renames, so a process killed at any moment leaves
the previous complete folder or the new complete one, never new weights beside an old card. A checkpoint's
``state.json`` records the sha256 of its ``state.safetensors`` and a generation stored in both files;
:func:`load_checkpoint` refuses a checkpoint whose two files do not belong together.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from . import __version__
from .contract import (CARD_NAME, MODEL_FORMAT, MODEL_FORMAT_VERSION, OPTIMIZER_NAME, PAINTED_NAME, WEIGHTS_NAME,
                       check_weights, load_card, sha256_file)
from .data import axis_index
from .errors import UserError
from .io import replace_folder, resolve_folder, swap_names
from .models import ArchitectureConfig, SegmentationNetwork, UnsupportedArchitecture


def _tensor_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors file of ``tensors`` (CPU copies), in memory: hashed and written in one go."""
    return save_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header ({} when it has none or cannot be parsed)."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n].decode("utf-8"))
        return dict(header.get("__metadata__") or {})
    except (struct.error, ValueError, UnicodeDecodeError, AttributeError):
        return {}


#: What a model folder may hold besides the model: ``mismatch train`` replaces the whole folder when the
#: new model is complete, so anything else in it would be lost; such a folder is refused instead.
_OWN_ENTRIES = {CARD_NAME, WEIGHTS_NAME, OPTIMIZER_NAME, PAINTED_NAME, "checkpoint",
                *(p.name for p in swap_names("checkpoint")), ".DS_Store", "Thumbs.db", "desktop.ini"}


def foreign_entries(model_dir: str | os.PathLike) -> list[str]:
    """Names in ``model_dir`` that a model folder does not hold (empty for a missing folder)."""
    folder = Path(model_dir)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir()
                  if p.name not in _OWN_ENTRIES and not (p.name.startswith(".") and ".tmp-" in p.name))


def check_model_destination(model_dir: str | os.PathLike, option: str = "--out") -> None:
    """:class:`UserError` unless ``model_dir`` may be replaced by a model folder: missing, empty, or a model
    folder (with or without a checkpoint), and not a file."""
    folder = Path(model_dir)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{option} {model_dir}: exists and is not a folder; give a folder for the model")
    other = foreign_entries(folder)
    if other:
        shown = ", ".join(other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
        raise UserError(f"{option} {model_dir}: the folder holds files that are not a model's ({shown}); the "
                        "model folder is replaced as a whole when training completes, so give a new folder "
                        "or an existing model folder")


def _model_complete(folder: Path) -> bool:
    try:
        card = json.loads((folder / CARD_NAME).read_text(encoding="utf-8"))
        weights = folder / card["weights"].get("file", WEIGHTS_NAME)
        return sha256_file(weights) == card["weights"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def save_model(model_dir: str | os.PathLike, snapshots: list[dict[str, torch.Tensor]], card: dict[str, Any],
               optimizer_state: dict[str, torch.Tensor] | None = None, painted: "PaintedSlices | None" = None
               ) -> Path:
    """Write ``model.safetensors`` (every snapshot), ``model.json`` and, when given, ``optimizer.safetensors``
    (``optimizer_state``, :attr:`mismatch.train.FitResult.optimizer_state`) and ``painted.safetensors``
    (``painted``) as one unit; returns the folder.

    ``card`` must hold at least ``architecture`` (an :class:`ArchitectureConfig` dict), ``classes``,
    ``channels``, ``normalisation`` and ``slice_axis``; format, versions and the weights entry are added.
    An existing folder is replaced only when the new one is complete (:func:`mismatch.io.replace_folder`);
    a folder holding other files is a :class:`UserError` (:func:`check_model_destination`).
    """
    if not snapshots:
        raise ValueError("no weights to save")
    folder = Path(model_dir)
    check_model_destination(folder)
    tensors = {f"snapshot{i}.{k}": v for i, sd in enumerate(snapshots) for k, v in sd.items()}
    data = _tensor_bytes(tensors, metadata={"format": MODEL_FORMAT})
    card = dict(card)
    card.update({
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION if (card.get("architecture") or {}).get("context") else 1,
        "engine_version": __version__,
        "weights": {"file": WEIGHTS_NAME, "sha256": hashlib.sha256(data).hexdigest(), "snapshots": len(snapshots)},
    })
    text = json.dumps(card, indent=2, sort_keys=False) + "\n"

    def write(new: Path) -> None:
        (new / WEIGHTS_NAME).write_bytes(data)
        if optimizer_state:
            (new / OPTIMIZER_NAME).write_bytes(_tensor_bytes(optimizer_state))
        if painted is not None:
            (new / PAINTED_NAME).write_bytes(painted.to_bytes())
        (new / CARD_NAME).write_text(text, encoding="utf-8")

    return replace_folder(folder, write, _model_complete)


def read_card(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``model.json`` (:func:`mismatch.contract.load_card`, then the network it describes);
    a :class:`UserError` says what is wrong with it."""
    folder = Path(model_dir)
    if folder.is_file() and folder.name == CARD_NAME:
        folder = folder.parent
    folder = resolve_folder(folder, _model_complete)   # a kill while the folder was being replaced
    card_path = folder / CARD_NAME
    if not card_path.is_file():
        raise UserError(f"{folder}: not a MisMatch model folder (no {CARD_NAME}); "
                        "give the folder that 'mismatch train --out' wrote")
    card = load_card(card_path, f"update the MisMatch engine (installed: {__version__})", error=UserError)
    try:
        arch = ArchitectureConfig.from_dict(card["architecture"])
        arch.decoders  # noqa: B018 - validates the name
    except UnsupportedArchitecture as exc:
        raise UserError(f"{card_path}: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError):
        raise UserError(f"{card_path}: unknown architecture {card['architecture']!r}") from None
    if len(card["channels"]) != arch.in_channels:   # both are lists (checked by load_card)
        n = len(card["channels"])
        raise UserError(f"{card_path}: the card lists {n} channel(s) but the network takes {arch.in_channels} "
                        "(architecture.in_channels); the model card is damaged or was edited: copy the model "
                        "folder again")
    if len(card["classes"]) + 1 != arch.num_classes:
        n = len(card["classes"])
        raise UserError(f"{card_path}: the card lists {n} class(es) but the network has {arch.num_classes - 1} "
                        "(architecture.num_classes minus background); the model card is damaged or was "
                        "edited: copy the model folder again")
    return card


def load_model(model_dir: str | os.PathLike, device: torch.device | str = "cpu"
               ) -> tuple[dict[str, Any], list[SegmentationNetwork]]:
    """Validate the card and the weights' checksum, rebuild one network per snapshot (eval mode)."""
    folder = Path(model_dir)
    if folder.is_file():
        folder = folder.parent
    card = read_card(folder)
    folder = resolve_folder(folder, _model_complete)
    weights = check_weights(folder, card, error=UserError)
    try:
        tensors = load_bytes(weights.read_bytes())
    except Exception as exc:  # safetensors raises several types for a damaged header
        raise UserError(f"{weights}: cannot read the weights ({exc})") from None
    config = ArchitectureConfig.from_dict(card["architecture"])
    networks = []
    for i in range(int(card["weights"].get("snapshots", 1))):
        prefix = f"snapshot{i}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        net = SegmentationNetwork(config)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise UserError(f"{weights}: the weights do not fit the architecture in the card "
                            f"({str(exc).splitlines()[0]})") from None
        networks.append(net.to(device).eval())
    return card, networks


def read_optimizer_state(model_dir: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """The optimiser's state saved with a model (``optimizer.safetensors``), or None when the folder has none
    or it cannot be read: a warm start then begins with fresh optimiser state, as models written before it
    do."""
    folder = Path(model_dir)
    folder = resolve_folder(folder.parent if folder.is_file() else folder, _model_complete)
    try:
        return load_bytes((folder / OPTIMIZER_NAME).read_bytes())
    except Exception:  # noqa: BLE001 - missing or damaged: an aid to a warm start, not a part of the model
        return None


@dataclass
class PaintedSlices:
    """The painted slices a model was trained from: ``slices`` (indices along ``axis``, ``k``, ``j`` or ``i``),
    ``labels`` (``[n, H, W]``, the label values as painted on each, all zero on a slice listed as empty) and
    ``image_sha256`` (:func:`image_fingerprint` of the image on those slices), which tells whether an image
    given to ``segment`` is the one they were painted on."""

    axis: str
    slices: np.ndarray
    labels: np.ndarray
    image_sha256: str

    @classmethod
    def take(cls, labels: np.ndarray, image: np.ndarray, axis: str, slices) -> "PaintedSlices":
        """From the painted label map ``labels [K, J, I]`` and the image as read ``image [C, K, J, I]``."""
        slices = np.asarray(slices, dtype=np.int64)
        taken = np.take(labels, slices, axis=axis_index(axis))
        top = int(taken.max()) if taken.size else 0
        dtype = np.uint8 if top < 256 else np.int16 if top < 32768 else np.int32
        return cls(axis, slices, np.moveaxis(taken, axis_index(axis), 0).astype(dtype),
                   image_fingerprint(image, axis, slices))

    def label_map(self, shape) -> np.ndarray:
        """The painted label map ``[K, J, I]`` of a volume of ``shape``: the painted slices, zero elsewhere."""
        out = np.zeros(tuple(shape), dtype=self.labels.dtype)
        np.moveaxis(out, axis_index(self.axis), 0)[self.slices] = self.labels
        return out

    def to_bytes(self) -> bytes:
        return _tensor_bytes({"slices": torch.from_numpy(self.slices), "labels": torch.from_numpy(self.labels)},
                             metadata={"format": "mismatch-painted", "slice_axis": self.axis,
                                       "image_sha256": self.image_sha256})


def image_fingerprint(image: np.ndarray, axis: str, slices) -> str:
    """sha256 of the image as read (``[C, K, J, I]``, float32) on ``slices`` along ``axis``."""
    digest = hashlib.sha256()
    for s in slices:
        digest.update(np.ascontiguousarray(np.take(image, int(s), axis=1 + axis_index(axis)),
                                           dtype=np.float32).tobytes())
    return digest.hexdigest()


def read_painted(model_dir: str | os.PathLike) -> PaintedSlices | None:
    """The painted slices saved with a model (``painted.safetensors``), or None when the folder has none (a
    model written before they were kept, or by a training without painted slices) or it cannot be read."""
    folder = Path(model_dir)
    folder = resolve_folder(folder.parent if folder.is_file() else folder, _model_complete)
    try:
        data = (folder / PAINTED_NAME).read_bytes()
        meta = _safetensors_metadata(data)
        tensors = load_bytes(data)
        painted = PaintedSlices(str(meta["slice_axis"]), tensors["slices"].numpy().astype(np.int64),
                                tensors["labels"].numpy(), str(meta["image_sha256"]))
    except Exception:  # noqa: BLE001 - missing or damaged: segment then needs --labels, as for older models
        return None
    if painted.labels.ndim != 3 or len(painted.slices) != painted.labels.shape[0] or meta.get("format") != \
            "mismatch-painted":
        return None
    return painted


# -- resumable checkpoints -------------------------------------------------------------------------------

CHECKPOINT_FORMAT = 2
_CHECKPOINT_KEYS = ("step", "config", "optimizer", "sampler", "history", "snapshots")


def _checkpoint_complete(folder: Path) -> bool:
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        return (folder / "state.safetensors").stat().st_size == state["weights_bytes"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def save_checkpoint(folder: str | os.PathLike, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Write ``state.safetensors`` and ``state.json`` (JSON for everything that is not a tensor) as one unit:
    a new folder swapped in by renames (:func:`mismatch.io.replace_folder`). ``state.json`` records the
    sha256 of the tensors and a generation that the tensors' metadata repeats."""
    generation = uuid.uuid4().hex
    data = _tensor_bytes(tensors, metadata={"generation": generation})
    state = {**state, "checkpoint_format": CHECKPOINT_FORMAT, "generation": generation,
             "weights_sha256": hashlib.sha256(data).hexdigest(), "weights_bytes": len(data)}
    text = json.dumps(state) + "\n"

    def write(new: Path) -> None:
        (new / "state.safetensors").write_bytes(data)
        (new / "state.json").write_text(text, encoding="utf-8")

    replace_folder(folder, write, _checkpoint_complete)


def check_checkpoint(folder: str | os.PathLike) -> dict[str, Any]:
    """The state of the checkpoint in ``folder`` after every check of :func:`load_checkpoint` (``--resume``
    checks it before reading any input)."""
    return _read_checkpoint(folder, tensors=False)[1]


def load_checkpoint(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and state of the checkpoint in ``folder``; a missing, damaged or torn checkpoint (its two
    files from different checkpoints) is a :class:`UserError` of one line."""
    return _read_checkpoint(folder, tensors=True)


def _read_checkpoint(folder, tensors: bool):
    given = Path(folder)
    folder = resolve_folder(given, _checkpoint_complete)   # a kill while it was being replaced
    json_path, tensor_path = folder / "state.json", folder / "state.safetensors"
    fresh = "; it cannot be resumed: run without --resume to start afresh"
    if not json_path.is_file() and not tensor_path.is_file():
        raise UserError(f"{given}: no checkpoint to resume from; run without --resume to start training")
    if not json_path.is_file() or not tensor_path.is_file():
        present = json_path.name if json_path.is_file() else tensor_path.name
        raise UserError(f"{folder}: the checkpoint is incomplete (only {present}){fresh}")
    try:
        state = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{json_path}: the checkpoint is damaged (not valid JSON: {exc}){fresh}") from None
    if not isinstance(state, dict):
        raise UserError(f"{json_path}: the checkpoint is damaged (not a JSON object){fresh}")
    if "weights_sha256" not in state:
        raise UserError(f"{json_path}: the checkpoint has no checksum (written by an older engine), so whether "
                        "its two files belong together cannot be checked; run without --resume to start afresh")
    missing = [k for k in _CHECKPOINT_KEYS if k not in state]
    if missing:
        raise UserError(f"{json_path}: the checkpoint is damaged (it lacks {', '.join(missing)}){fresh}")
    data = tensor_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != state["weights_sha256"]:
        torn = _safetensors_metadata(data).get("generation") not in (None, state.get("generation"))
        why = ("torn: state.safetensors and state.json are from different checkpoints" if torn else
               "state.safetensors does not match the checksum in state.json")
        raise UserError(f"{folder}: the checkpoint is damaged ({why}){fresh}")
    if not tensors:
        return None, state
    try:
        loaded = load_bytes(data)
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise UserError(f"{tensor_path}: the checkpoint is damaged ({exc}){fresh}") from None
    return loaded, state


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimiser's state dict into tensors (for safetensors) and JSON-able rest."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_tensor_state(tensors: dict[str, torch.Tensor]) -> dict[int, dict[str, Any]]:
    """``{parameter index: {name: tensor}}`` from the ``optim.<index>.<name>`` entries of ``tensors``."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    return state


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           rest: dict[str, Any]) -> None:
    state = _optimizer_tensor_state(tensors)
    for pid, values in rest.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": rest["param_groups"]})


def load_optimizer_moments(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> bool:
    """Start ``optimizer`` from another run's state (``tensors`` as :func:`optimizer_to_tensors` names them:
    Adam's step count and moments per parameter) and keep its own settings (learning rate, weight decay):
    a warm start's first steps then move each weight by its established scale instead of the full
    learning rate that fresh moments give. False, and nothing changed, when the tensors do not fit the
    optimiser's parameters (another architecture or width)."""
    groups = optimizer.state_dict()["param_groups"]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = _optimizer_tensor_state(tensors)
    fits = bool(state) and all(
        0 <= pid < len(params) and all(v.dim() == 0 or v.shape == params[pid].shape for v in st.values())
        for pid, st in state.items())
    if fits:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    return fits


def state_to_cpu(model: torch.nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy on the CPU of ``model``'s weights, or of a dict of tensors (a snapshot, a checkpoint's weights, the
    averaged weights)."""
    state = model if isinstance(model, dict) else model.state_dict()
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


#: A model folder's checkpoint subfolder (``mismatch train --resume`` reads it)
CHECKPOINT_DIR = "checkpoint"


class TrainingCheckpoint:
    """A training run's whole state in ``folder``, for ``--resume``: the network, the method's own tensors
    (e.g. an EMA teacher), the optimiser, the sampler, the torch generator, the kept snapshots, the weights
    averaged so far (``average_span``), the loss history and the batch sizes (halved after running out of
    memory). :meth:`save` writes it as one unit (:func:`save_checkpoint`), :meth:`load` reads and checks it
    (:func:`load_checkpoint`), :meth:`restore` puts it back into a run. ``run``: a
    :class:`mismatch.train.TrainingRun`."""

    #: settings a run must share with the checkpoint it resumes
    SAME_SETTINGS = ("method", "width", "patch_size", "axis", "seed")

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def save(self, run, config: dict) -> None:
        tensors, optimizer_rest = optimizer_to_tensors(run.optimizer)
        tensors.update({f"model.{k}": v for k, v in state_to_cpu(run.net).items()})
        tensors["rng.torch"] = torch.get_rng_state()
        tensors.update({f"method.{k}": v for k, v in run.method.state_dict().items()})
        for i, snapshot in enumerate(run.snapshots):
            tensors.update({f"snapshot{i}.{k}": v for k, v in snapshot.items()})
        if run.averaged:
            tensors.update({f"average.{k}": v for k, v in state_to_cpu(run.average).items()})
        save_checkpoint(self.folder, tensors, {
            "step": run.step, "config": config, "optimizer": optimizer_rest, "sampler": run.sampler.state_dict(),
            "history": run.history, "snapshots": len(run.snapshots), "batch_sizes": [run.batch_l, run.batch_u],
            "averaged": run.averaged,
            "engine_version": __version__,
        })

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return load_checkpoint(self.folder)

    def restore(self, run, config: dict, loaded: tuple[dict[str, torch.Tensor], dict[str, Any]]) -> None:
        """Put ``loaded`` (what :meth:`load` returned, possibly on another process) back into ``run``, whose
        settings ``config`` must match the checkpoint's (:data:`SAME_SETTINGS`)."""
        tensors, state = loaded
        for key in self.SAME_SETTINGS:
            if state["config"].get(key) != config.get(key):
                raise UserError(f"--resume: the checkpoint was made with {key}={state['config'].get(key)!r}, "
                                f"not {config.get(key)!r}; use the same settings or start afresh")

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        run.net.load_state_dict(part("model."))
        run.method.load_state_dict(part("method."), run.net)
        optimizer_from_tensors(run.optimizer, tensors, state["optimizer"])
        run.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(tensors["rng.torch"])
        run.step, run.history = state["step"], state["history"]
        run.batch_l, run.batch_u = state.get("batch_sizes", [run.batch_l, run.batch_u])
        run.snapshots = [part(f"snapshot{i}.") for i in range(state["snapshots"])]
        run.averaged = int(state.get("averaged", 0))   # absent: a checkpoint written before weight averaging
        if run.averaged:
            device = next(run.net.parameters()).device
            run.average = {k: v.to(device) for k, v in part("average.").items()}
