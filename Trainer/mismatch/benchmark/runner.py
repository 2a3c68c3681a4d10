"""``mismatch benchmark``: the paper's comparisons on the real data that can be had here.

For each data set, labelled-slice count and seed, :func:`~mismatch.benchmark.datasets.draw_split` draws the
labelled slices (the rest of the volume is the unlabelled pool) and the test slices (every unlabelled slice,
with or without foreground); every selected method is trained with the same budget (steps, width, batch,
patch, learning rate) on exactly those slices and evaluated on the test slices. The free baselines a user has
without training run on the same labelled slices: copying the nearest labelled slice and shape-based
interpolation (:mod:`mismatch.prior`, in-process, always run) and Slicer's *Fill between slices* and *Grow
from seeds* (when slicer-core is installed); the report names the best of them, and of the supervised U-Nets,
per data set and count, and sets every other method against it. Each finished run is appended to
``runs.json`` at once, so an interrupted benchmark resumes where it stopped, and the report (``results.md``
and the figures) is rebuilt from ``runs.json`` alone.

Independent runs can be spread over several devices (``--devices cuda:0,cuda:1``): one worker process per
device, one run per device at a time.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from ..errors import Cancelled, UserError
from .tables import BASELINES  # what a user can have instead of the default model (the report's bar)

if TYPE_CHECKING:
    from ..train import TrainConfig

#: learned methods in table order
LEARNED = ["unet", "unet-strong", "sup2", "mt", "fixmatch", "cct", "mta", "morph", "mm-a", "mm-b", "mm-c",
           "mismatch"]
#: non-learned baselines from :mod:`mismatch.prior` and :mod:`mismatch.benchmark.threshold` (numpy + scipy):
#: in-process, always run
FREE = ["nearest-slice", "shape-interpolation", "threshold-islands"]
#: Slicer's Segment Editor effects, run when slicer-core is installed
CLASSICAL = ["slicer-fill-between", "slicer-grow-from-seeds"]
#: the methods of a benchmark run when none are named
DEFAULT_METHODS = LEARNED + FREE + CLASSICAL
#: the test slices of a draw: 2 = every unlabelled slice (1, before: only the unlabelled slices with foreground).
#: Runs made with another definition are not comparable and are not mixed in one runs.json.
SPLIT_VERSION = 2
ABLATION = ["mm-a", "mm-b", "mm-c", "mismatch"]
ALPHAS = [0.0, 0.0005, 0.001, 0.002, 0.004]
AXIS_NAMES = {0: "k", 1: "j", 2: "i"}
RUNS_FILE = "runs.json"
#: the budget of ``mismatch benchmark --quick`` (:meth:`BenchmarkConfig.quick`)
QUICK_BUDGET = {"steps": 60, "width": 8, "batch_size": 2, "patch_size": 96, "lr": 2e-3}


@dataclass
class Budget:
    """The training budget of every learned run: a training preset (:data:`mismatch.train.PRESETS`; ``default``
    is what a user gets) and overrides of it (None: the preset's value). The benchmark's and the simulation's
    settings (:class:`BenchmarkConfig`, :class:`~mismatch.benchmark.loop.LoopConfig`) extend it."""

    preset: str = "default"
    steps: int | None = None
    width: int | None = None
    batch_size: int | None = None
    patch_size: int | None = None
    lr: float | None = None
    context: int | None = None

    def train_config(self, method: str, **overrides) -> TrainConfig:
        """The training settings of ``method`` at this budget."""
        from ..train import preset_config

        return preset_config(self.preset, method, steps=self.steps, width=self.width, batch_size=self.batch_size,
                             patch_size=self.patch_size, lr=self.lr, context=self.context, **overrides)

    def budget_settings(self) -> dict:
        """The budget as MisMatch trains at it (the preset's value where no override is given): the part of
        the settings that a resumed ``runs.json`` or ``loop.json`` must share."""
        from ..train import patch_size_at

        c = self.train_config("mismatch")
        unlabelled = c.unlabelled_batch_size or c.batch_size
        return {"preset": self.preset, "steps": c.steps, "width": c.width, "batch_size": c.batch_size,
                "patch_size": c.patch_size, "lr": c.lr,
                # absent: runs made before they existed (as many unlabelled slices a step as labelled ones)
                **({"unlabelled_batch_size": unlabelled} if unlabelled != c.batch_size else {}),
                **({"context": c.context} if c.context else {}),
                # absent: runs made before it existed (the full patch from the first step)
                **({"early_patch": [c.early_patch_size, c.early_patch_fraction]}
                   if patch_size_at(0, c) != (c.patch_size or None) else {}),
                # absent: runs made before it existed (the last weights kept)
                **({"average": [c.average_span, c.lr_floor]} if c.average_span else {})}


def _comparable(settings: dict | None) -> dict | None:
    """``settings`` with its painted-slice prior as :meth:`PriorSettings.from_dict` reads it: a prior recorded
    before a setting existed holds that setting at the value that gives the prior as it was, so it equals
    today's where today's default is that value (a later, neutral setting does not make old runs another
    budget)."""
    if not settings or not isinstance(settings.get("prior"), dict):
        return settings
    from ..prior import PriorSettings

    return {**settings, "prior": PriorSettings.from_dict(settings["prior"]).to_dict()}


def check_same_settings(path: Path, recorded: dict | None, key: str, settings: dict, made: str) -> None:
    """:class:`UserError` when the results file ``path``, whose stored configuration is ``recorded``, holds
    ``made`` (runs, rounds) made with other training settings (``recorded[key]``) than ``settings``: resuming
    would mix budgets."""
    if recorded and _comparable(recorded.get(key)) != _comparable(settings):
        raise UserError(f"{path} holds {made} made with other training settings ({recorded.get(key)}); use "
                        "another --out folder or the same settings")


@dataclass
class BenchmarkConfig(Budget):
    """Everything a benchmark run depends on (the :class:`Budget` and what is compared); stored in ``runs.json``."""

    datasets: list[str] = field(default_factory=lambda: ["ctchest-lungs"])
    labelled: list[int] = field(default_factory=lambda: [3, 5, 10])
    seeds: int = 3
    # where the labelled slices go (datasets.PLACEMENTS): "random" draws other slices for each seed;
    # "even" spaces them evenly over the structure's extent, the same for every seed (the seed varies the
    # training alone, so the spread over seeds is the run-to-run spread a user sees on the same slices)
    placement: str = "random"
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    alpha_sweep: list[float] = field(default_factory=lambda: list(ALPHAS))
    alpha: float = 0.002
    # methods whose headline result uses what the painted slices imply (the product's segment --labels);
    # every learned run also records the other variant (network alone / with the prior) for the ablation
    prior_methods: list[str] = field(default_factory=lambda: ["mismatch"])
    n_test: int | None = None
    dataset_options: dict[str, dict] = field(default_factory=dict)
    data_dir: str | None = None
    devices: list[str] = field(default_factory=lambda: ["auto"])

    @classmethod
    def quick(cls, **overrides) -> "BenchmarkConfig":
        """Minutes on a 2-core CPU: small width, few steps, whole slices of one real data set."""
        base = dict(datasets=["ctchest-lungs"], labelled=[3], seeds=2, alpha_sweep=[0.0, 0.002], **QUICK_BUDGET)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    def training_settings(self) -> dict:
        """What makes two benchmarks' runs comparable (checked when ``runs.json`` is resumed): the budget, and
        the preset's method options and painted-slice prior (a change of either must not resume into runs
        made with the old ones)."""
        from ..train import PRESETS

        return {**self.budget_settings(), "method_options": PRESETS[self.preset]["method_options"],
                "prior": self.train_config("mismatch").prior}


# -- the plan -----------------------------------------------------------------------------------------------

def run_key(spec: dict) -> str:
    """Identity of a run: a finished run with the same key is not trained again."""
    alpha = spec.get("alpha")
    return "|".join(str(x) for x in (spec["dataset"], spec["method"], spec["n_labelled"], spec["seed"],
                                     "" if alpha is None else f"{alpha:g}", spec.get("group", "main")))


def plan_runs(config: BenchmarkConfig, available: Callable[[str], bool] | None = None) -> list[dict]:
    """The list of run specifications (dicts), main table first, then the alpha sweep.

    The alpha sweep trains MisMatch at each alpha on the first data set and the smallest labelled count, when
    MisMatch is among the methods; the run at the default alpha is shared with the main table. A method this
    engine does not know is a :class:`UserError`.
    """
    from ..methods import METHODS

    unknown = [m for m in config.methods if m not in METHODS and m not in FREE and m not in CLASSICAL]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)}; choose from "
                        f"{', '.join(sorted(METHODS) + FREE + CLASSICAL)}")
    available = available or (lambda m: True)
    specs = []
    for dataset in config.datasets:
        for n in config.labelled:
            for seed in range(config.seeds):
                for method in config.methods:
                    if not available(method):
                        continue
                    specs.append({"dataset": dataset, "method": method, "n_labelled": n, "seed": seed,
                                  "alpha": config.alpha if _uses_unlabelled(method) else None, "group": "main"})
    if config.alpha_sweep and config.datasets and "mismatch" in config.methods:   # MisMatch's own sweep
        dataset, n = config.datasets[0], min(config.labelled)
        for alpha in config.alpha_sweep:
            if abs(alpha - config.alpha) < 1e-12:
                continue  # the main table's run
            for seed in range(config.seeds):
                specs.append({"dataset": dataset, "method": "mismatch", "n_labelled": n, "seed": seed,
                              "alpha": float(alpha), "group": "alpha"})
    return specs


def free_baseline(method: str, sparse: np.ndarray, labelled: Sequence[int], case) -> np.ndarray:
    """The prediction of a free baseline (:data:`FREE`) from the labelled slices ``sparse`` of ``case``."""
    from ..prior import nearest_slice, shape_interpolation
    from .threshold import threshold_islands

    if method == "nearest-slice":
        return nearest_slice(sparse, labelled, axis=case.axis)
    if method == "shape-interpolation":
        return shape_interpolation(sparse, labelled, axis=case.axis, spacing=case.spacing,
                                   num_classes=len(case.classes) + 1)
    if method == "threshold-islands":
        return threshold_islands(case.image[0], sparse, labelled, axis=case.axis)
    raise ValueError(f"{method!r} is not a free baseline ({', '.join(FREE)})")


def _uses_unlabelled(method: str) -> bool:
    from ..methods import METHODS, make_method

    return method in METHODS and bool(make_method(method).uses_unlabelled)


# -- one run ------------------------------------------------------------------------------------------------

_CASES: dict[tuple, list] = {}


def _cases(dataset: str, config: BenchmarkConfig) -> list:
    from .datasets import load_dataset

    key = (dataset, json.dumps(config.dataset_options.get(dataset, {}), sort_keys=True), config.data_dir)
    if key not in _CASES:
        _CASES.clear()  # one data set in memory at a time
        _CASES[key] = load_dataset(dataset, data_dir=config.data_dir, **config.dataset_options.get(dataset, {}))
    return _CASES[key]


def _per_slice_iou(pred: np.ndarray, truth: np.ndarray, slices: Sequence[int], axis: int) -> list[float]:
    out = []
    for s in slices:
        p, t = np.take(pred, s, axis=axis) > 0, np.take(truth, s, axis=axis) > 0
        union = np.logical_or(p, t).sum()
        out.append(float(np.logical_and(p, t).sum() / union) if union else 1.0)
    return out


def case_classes(case) -> list[dict]:
    """The classes of a benchmark case as a model card lists them (value and name; palette colours)."""
    from ..classes import default_classes

    classes = default_classes(list(case.classes))
    for c in classes:
        c["name"] = case.classes[c["value"]]
    return classes


def run_one(spec: dict, config: BenchmarkConfig, device: str = "auto") -> list[dict]:
    """Train (or run) one method on one labelled-slice draw of every case of the data set; one result per case."""
    import torch

    from ..data import Normalisation
    from ..device import resolve_device
    from ..inference import segment_volume
    from ..metrics import evaluate_arrays
    from ..models import count_parameters
    from ..pipeline import painted_slice_prior, train_and_segment
    from ..prior import PriorSettings
    from .classical import labelled_slices_only, run_in_subprocess
    from .datasets import draw_split

    results = []
    for case in _cases(spec["dataset"], config):
        labelled, unlabelled, test = draw_split(case.label, case.axis, spec["n_labelled"], spec["seed"],
                                                n_test=config.n_test, placement=config.placement)
        sparse = labelled_slices_only(case.label, labelled, case.axis)
        n_slices = int(case.label.shape[case.axis])
        result = {**spec, "case": case.name, "synthetic": case.synthetic, "labelled_slices": labelled.tolist(),
                  "test_slices": test.tolist(), "n_test": int(len(test)), "n_slices": n_slices,
                  "split_version": SPLIT_VERSION, "placement": config.placement,
                  "settings": config.training_settings()}
        t0 = time.monotonic()
        if spec["method"] in CLASSICAL or spec["method"] in FREE:
            if spec["method"] in FREE:
                pred = free_baseline(spec["method"], sparse, labelled, case)
            else:
                kwargs = {"labels": sparse, "labelled_slices": labelled.tolist(), "axis": case.axis,
                          "spacing": list(case.spacing)}
                if spec["method"] == "slicer-grow-from-seeds":
                    kwargs["image"] = case.image[0]
                pred = run_in_subprocess(spec["method"], **kwargs)
            seconds = time.monotonic() - t0
            ev = evaluate_arrays(pred, case.label, slices=test.tolist(), axis=case.axis,
                                 classes=list(case.classes))
            result.update(iou=ev["iou"], dice=ev["dice"], **_class_iou(ev, case), ece_all=None, ece_band=None, params=0,
                          ms_per_slice=1000 * seconds / n_slices, train_seconds=0.0, seconds=round(seconds, 6),
                          per_slice_iou=_per_slice_iou(pred, case.label, test, case.axis), device="cpu")
            results.append(result)
            continue
        dev = resolve_device(device)
        norm = Normalisation(hu_window=case.window)
        volume = norm.apply(case.image)
        train_config = config.train_config(
            spec["method"], seed=spec["seed"], axis=AXIS_NAMES[case.axis],
            alpha=spec["alpha"] if spec.get("alpha") is not None else config.alpha, checkpoint_every=10 ** 9)
        use_prior = spec["method"] in config.prior_methods and train_config.prior is not None
        prepared = time.monotonic() - t0
        run = train_and_segment(volume, sparse, labelled, case_classes(case), train_config, normalisation=norm,
                                spacing_kji=case.spacing, geometry=case.geometry, device=dev, use_prior=use_prior,
                                truth=case.label, eval_slices=test.tolist())
        fitted, nets, seg = run.fitted, run.networks, run.segmentation
        train_seconds = prepared + run.train_seconds
        # the other variant, for the ablation: the network alone, or with the prior (the default preset's
        # settings where the budget's preset has none)
        other_prior = None if use_prior else painted_slice_prior(
            sparse, labelled, train_config.axis, case.spacing, len(case.classes) + 1,
            train_config.prior or PriorSettings().to_dict(), volume)
        other = segment_volume(nets, volume, axis=AXIS_NAMES[case.axis], batch_size=8, device=dev,
                               truth=case.label, eval_slices=test.tolist(), prior=other_prior)
        result["prior"] = use_prior
        result["other"] = {"prior": not use_prior, "iou": other.evaluation["mean"]["iou"],
                           "ece_band": other.evaluation["mean"]["calibration"]["band"]["ece"]}
        ev = seg.evaluation
        mean = ev["mean"]
        outputs = ["mean"] + ([n.replace(" ", "_") for n in nets[0].decoder_names] if len(nets[0].decoders) > 1
                              else [])
        calibration = {name: ev[name]["calibration"]["band"] for name in outputs}
        result.update(
            iou=mean["iou"], dice=mean["dice"], **_class_iou(mean, case), ece_all=mean["calibration"]["all"]["ece"],
            ece_band=mean["calibration"]["band"]["ece"], params=count_parameters(nets[0]),
            ms_per_slice=1000 * seg.seconds / n_slices, train_seconds=round(train_seconds, 2),
            seconds=round(train_seconds + seg.seconds, 3),
            per_slice_iou=_per_slice_iou(seg.labels, case.label, test, case.axis), device=str(dev),
            decoders={name: {"iou": ev[name]["iou"], "ece_all": ev[name]["calibration"]["all"]["ece"],
                             "ece_band": ev[name]["calibration"]["band"]["ece"]} for name in calibration},
            reliability=calibration,
            final_losses={k: v for k, v in fitted.history[-1].items() if k not in ("step", "lr")}
            if fitted.history else {})
        results.append(result)
        del nets, fitted, run
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return results


# -- bookkeeping --------------------------------------------------------------------------------------------

def read_json(path: Path, empty: dict) -> dict:
    """The results file ``path`` (a benchmark's runs.json, a simulation's loop.json), ``empty`` when there is none."""
    if not path.exists():
        return empty
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); move it away to start afresh") from None


def write_json(path: Path, data: dict) -> None:
    """Write a results file whole or not at all (a temporary file beside it, then renamed over it)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def load_runs(out_dir: str | os.PathLike) -> dict:
    return read_json(Path(out_dir) / RUNS_FILE, {"config": None, "runs": []})


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _worker_init(queue) -> None:
    global _WORKER_DEVICE
    _WORKER_DEVICE = queue.get()


_WORKER_DEVICE = "auto"


def _worker_run(spec: dict, config_dict: dict) -> tuple[dict, list[dict] | None, str | None]:
    try:
        return spec, run_one(spec, BenchmarkConfig(**config_dict), device=_WORKER_DEVICE), None
    except Exception as exc:  # reported and recorded; the other runs go on
        return spec, None, f"{type(exc).__name__}: {exc}"


def expand_devices(devices: Sequence[str]) -> list[str]:
    """``["auto"]`` -> every CUDA GPU (one worker each) or the one best device; other lists as given."""
    import torch

    if list(devices) == ["auto"] or not devices:
        if torch.cuda.is_available() and torch.cuda.device_count() > 1:
            return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        return ["auto"]
    if list(devices) == ["all"]:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(n)] or ["cpu"]
    return list(devices)


def run_benchmark(config: BenchmarkConfig, out_dir: str | os.PathLike, *, log: Callable[[str], None] = print) -> dict:
    """Run every planned run not yet in ``out_dir/runs.json`` (runs that failed before are tried again), then
    write the report. Returns the JSON data."""
    from .classical import slicer_filters_available

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_runs(out)
    check_same_settings(out / RUNS_FILE, data.get("config"), "training", config.training_settings(), "runs")
    if data["runs"] and (data.get("config") or {}).get("split_version", 1) != SPLIT_VERSION:
        raise UserError(f"{out / RUNS_FILE} holds runs tested on other slices (before the test slices were every "
                        "unlabelled slice); use another --out folder (--report-only still rebuilds its report)")
    placed = run_placement(data)
    if data["runs"] and placed != config.placement:
        raise UserError(f"{out / RUNS_FILE} holds runs with the labelled slices placed {placed!r}, not "
                        f"{config.placement!r}; use another --out folder or --placement {placed}")
    have_slicer = slicer_filters_available()
    if not have_slicer and any(m in CLASSICAL for m in config.methods):
        log("slicer-core is not installed (pip install slicer-core, Python 3.11): the Slicer effects' rows are "
            "left out")
    specs = plan_runs(config, available=lambda m: have_slicer or m not in CLASSICAL)
    done = {run_key(r) for r in data["runs"]}
    data["failed"] = []
    todo = [s for s in specs if run_key(s) not in done]
    data["config"] = {"training": config.training_settings(), "benchmark": asdict(config),
                      "split_version": SPLIT_VERSION, "machine": machine_description()}
    log(f"{len(specs)} runs planned, {len(specs) - len(todo)} already in {out / RUNS_FILE}, {len(todo)} to do")
    devices = expand_devices(config.devices)
    t0 = time.monotonic()

    def record(i: int, spec: dict, results: list[dict] | None, error: str | None) -> None:
        if error is not None:
            data.setdefault("failed", []).append({**spec, "error": error})
            log(f"[{i}/{len(todo)}] {_describe(spec)}: FAILED {error}")
        else:
            data["runs"].extend(results)
            iou = ", ".join(f"{r['iou']:.3f}" if r.get("iou") is not None else "n/a" for r in results)
            log(f"[{i}/{len(todo)}] {_describe(spec)}: IoU {iou}  ({time.monotonic() - t0:.0f} s elapsed)")
        write_json(out / RUNS_FILE, data)

    if len(devices) <= 1 or len(todo) <= 1:
        for i, spec in enumerate(todo, 1):
            try:
                record(i, spec, run_one(spec, config, device=devices[0]), None)
            except (UserError, Cancelled):   # bad input, or Ctrl-C / SIGTERM: stop the benchmark, keep runs.json
                raise
            except Exception as exc:
                record(i, spec, None, f"{type(exc).__name__}: {exc}")
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        for d in devices:
            queue.put(d)
        log(f"spreading the runs over {len(devices)} devices: {', '.join(devices)}")
        with ProcessPoolExecutor(len(devices), mp_context=ctx, initializer=_worker_init,
                                 initargs=(queue,)) as pool:
            futures = [pool.submit(_worker_run, spec, asdict(config)) for spec in todo]
            for i, fut in enumerate(as_completed(futures), 1):
                record(i, *fut.result())
    write_report(data, out)
    log(f"wrote {out / 'results.md'} and the figures; every run is in {out / RUNS_FILE}")
    return data


def _class_iou(evaluation: dict, case) -> dict:
    """``{"class_iou": {class name: IoU}}`` from an evaluation's per-class overlap, for a case with more than one
    class (the headline ``iou`` is their mean); nothing for one class."""
    if len(case.classes) < 2:
        return {}
    per = evaluation["classes"]
    return {"class_iou": {name: per[str(c)]["iou"] for c, name in case.classes.items() if str(c) in per}}


def run_placement(data: dict) -> str:
    """How the labelled slices of the runs in ``data`` (runs.json) were placed; "random" for runs made before
    the placement was recorded."""
    return ((data.get("config") or {}).get("benchmark") or {}).get("placement", "random")


def _describe(spec: dict) -> str:
    alpha = f", alpha {spec['alpha']:g}" if spec.get("group") == "alpha" else ""
    return f"{spec['dataset']} {spec['method']} {spec['n_labelled']} labelled, seed {spec['seed']}{alpha}"


def machine_description() -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version()}


# -- the report ---------------------------------------------------------------------------------------------

def _fmt(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """"mean ± std" in %, as the main table writes it (None and NaN left out)."""
    from .tables import _fmt_mean_std

    return _fmt_mean_std(values, scale, digits)[0]


def alpha_table(runs: list[dict]) -> str:
    """MisMatch at each alpha (the sweep's runs and the main table's run at the default alpha)."""
    rows = defaultdict(list)
    for r in runs:
        if r["method"] == "mismatch" and r.get("alpha") is not None:
            rows[(r["dataset"], r["n_labelled"], float(r["alpha"]))].append(r)
    sweep_keys = {(r["dataset"], r["n_labelled"]) for r in runs if r.get("group") == "alpha"}
    lines = []
    for dataset, n in sorted(sweep_keys):
        lines += [f"**{dataset}**, {n} labelled slices, MisMatch", "",
                  "| alpha | IoU % | Dice % | ECE all % | ECE band % | runs |", "|---|---|---|---|---|---|"]
        for (d, k, alpha), rs in sorted(rows.items()):
            if (d, k) != (dataset, n):
                continue
            lines.append(f"| {alpha:g} | {_fmt([r['iou'] for r in rs])} | {_fmt([r.get('dice') for r in rs])} | "
                         f"{_fmt([r.get('ece_all') for r in rs], digits=2)} | "
                         f"{_fmt([r.get('ece_band') for r in rs], digits=2)} | {len(rs)} |")
        lines.append("")
    return "\n".join(lines) if lines else "_No alpha sweep in these runs._"


def decoder_table(runs: list[dict]) -> str:
    """IoU and ECE (band) of each decoder and of their mean, per two-decoder method (paper Fig. 4 in numbers)."""
    acc = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r.get("group", "main") != "main" or not r.get("decoders"):
            continue
        for name, v in r["decoders"].items():
            acc[(r["dataset"], r["method"])][name].append(v)
    if not acc:
        return "_No decoder results._"
    lines = ["| data set | method | output | IoU % | ECE all % | ECE band % |", "|---|---|---|---|---|---|"]
    for (dataset, method), per in acc.items():
        for name, vs in per.items():
            lines.append(f"| {dataset} | {method} | {name.replace('_', ' ')} | {_fmt([v['iou'] for v in vs])} | "
                         f"{_fmt([v['ece_all'] for v in vs], digits=2)} | "
                         f"{_fmt([v['ece_band'] for v in vs], digits=2)} |")
    return "\n".join(lines)


def _merged_reliability(runs: list[dict], method: str, output: str) -> dict | None:
    from ..calibration import CalibrationHistogram

    total = None
    for r in runs:
        h = (r.get("reliability") or {}).get(output) if r["method"] == method else None
        if h:
            hist = CalibrationHistogram.from_dict(h)
            total = hist if total is None else total + hist
    return None if total is None else total.to_dict()


def write_report(data: dict, out_dir: str | os.PathLike) -> Path:
    """``results.md`` with Table 1, the ECE, the decoders, the ablation and the alpha sweep, and the figures
    ``fig4-reliability-<data set>.png`` and ``fig5-ece-iou-<data set>.png``, from ``data["runs"]`` alone."""
    from ..plots import ece_vs_iou, iou_vs_labelled, reliability_diagram
    from .tables import DISPLAY_NAMES, METHOD_ORDER, baseline_table, class_table, prior_table, results_table

    out = Path(out_dir)
    runs = data["runs"]
    main = [r for r in runs if r.get("group", "main") == "main"]
    prior_methods = sorted({r["method"] for r in main if r.get("prior")}) or ["none"]
    cfg = (data.get("config") or {})
    lines = ["# MisMatch benchmark", ""]
    if cfg:
        lines += [f"Training budget, the same for every learned method: `{json.dumps(cfg.get('training'))}`. "
                  f"Machine: `{json.dumps(cfg.get('machine'))}`.", ""]
    if any(r.get("synthetic") for r in runs):
        lines += ["Data sets named `synthetic-*` are SYNTHETIC (the generated vessel phantom), not patient data.",
                  ""]
    versions = {r.get("split_version", 1) for r in main}
    tested = ("every slice that is not labelled, with or without the structure (false positives on slices "
              "without it count)" if versions == {SPLIT_VERSION} else
              "the slices not labelled; in runs made before split version 2 only those with foreground")
    placed = ("evenly spaced over the structure's extent (the slices where its cross-section is at least a "
              "tenth of the largest; with several classes, where any class's is a tenth of its own largest), the "
              "same slices for every seed: the seed varies the training alone, so the "
              "standard deviation over seeds is the run-to-run spread on the same painted slices"
              if run_placement(data) == "even" else
              "drawn at random for each seed among the slices where the structure's cross-section is at least a "
              "tenth of the largest, at least two slices apart where possible: the standard deviation over seeds "
              "mixes the choice of slices with the training's randomness")
    lines += ["## Table 1: foreground IoU on the test slices", "",
              f"Labelled slices: {placed}.", "",
              f"Test slices: {tested}; the IoU is pooled over the voxels of all test slices of a run.", "",
              results_table(main) if main else "_No runs._", ""]
    lines += ["## Against the best free baseline", "", baseline_table(main, BASELINES) if main else "_No runs._",
              ""]
    if any(r.get("class_iou") for r in main):
        lines += ["## Each class", "",
                  "Data sets with several classes: each class's IoU (pooled over the test slices of a run), mean ± "
                  "std over runs; Table 1's IoU is their mean.", "", class_table(main), ""]
    panels: dict = {}
    for r in sorted(main, key=lambda r: METHOD_ORDER.index(r["method"]) if r["method"] in METHOD_ORDER else 99):
        panels.setdefault(r["dataset"], {}).setdefault(r["method"], {}).setdefault(r["n_labelled"], []).append(
            r.get("iou"))
    if panels:
        iou_vs_labelled(panels, out / "fig-iou-vs-labelled.png", names=DISPLAY_NAMES,
                        title="IoU on the unlabelled slices against the number of labelled slices (mean ± std)")
        lines += ["## IoU against the number of labelled slices", "",
                  "Every method and baseline, per data set: the mean over seeds and its standard deviation "
                  "(the headline IoU of the tables above).", "", "![fig-iou-vs-labelled.png](fig-iou-vs-labelled.png)",
                  ""]
    lines += ["## What the painted slices add", "",
              "Every learned run is segmented twice from the same trained networks: the network alone, and with "
              "the painted slices kept as painted, the prior of their shape-based interpolation added to the "
              "network's log-odds and only the parts connected to painted voxels kept (`mismatch segment "
              "--labels`). The headline of each method (tables above) is the product's way for "
              f"{', '.join(prior_methods)} and the network alone for the others.", "",
              prior_table(main), ""]
    lines += ["## Each decoder and their mean (paper Fig. 4 in numbers)", "", decoder_table(runs), ""]
    ablation = [r for r in main if r["method"] in ABLATION]
    if len({r["method"] for r in ablation}) > 1:
        lines += ["## Decoder ablation (paper Sec. 3.3)", "", results_table(ablation), ""]
    lines += ["## Consistency weight alpha (paper Sec. 3.4)", "", alpha_table(runs), ""]
    figures = []
    for dataset in dict.fromkeys(r["dataset"] for r in main):
        rs = [r for r in main if r["dataset"] == dataset]
        n_min = min(r["n_labelled"] for r in rs)
        points = defaultdict(list)
        for r in rs:
            if r.get("ece_band") is not None and r.get("iou") is not None:
                points[r["method"]].append((r["iou"], r["ece_band"], r["n_labelled"]))
        if points:
            path = ece_vs_iou(points, out / f"fig5-ece-iou-{dataset}.png",
                              title=f"{dataset}: ECE (foreground band) against IoU, every run")
            figures.append(path.name)
        curves = {}
        subset = [r for r in rs if r["n_labelled"] == n_min]
        for method, output, label in (("unet", "mean", "U-Net"), ("mismatch", "positive_decoder", "positive decoder"),
                                      ("mismatch", "negative_decoder", "negative decoder"),
                                      ("mismatch", "mean", "MisMatch (mean)")):
            h = _merged_reliability(subset, method, output)
            if h is not None:
                curves[label] = h
        if curves:
            path = reliability_diagram(curves, out / f"fig4-reliability-{dataset}.png",
                                       title=f"{dataset}, {n_min} labelled slices, all seeds pooled: "
                                             "reliability in the foreground band")
            figures.append(path.name)
    if figures:
        lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    if data.get("failed"):
        lines += ["## Failed runs", ""] + [f"- {_describe(f)}: {f['error']}" for f in data["failed"]] + [""]
    path = out / "results.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
