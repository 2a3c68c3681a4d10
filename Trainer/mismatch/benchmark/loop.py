"""``mismatch simulate``: a simulated user in the annotate-and-retrain loop, on volumes with full labels.

The product's promise is a loop: paint a few slices, train, look where the model is unsure, label that slice,
retrain from the last model. This module plays the user. For each data set, method, start count ``K0``,
seed and *policy* (how the user picks the next slice), a trajectory runs:

1. round 0: ``K0`` labelled slices (the benchmark's draw, :func:`~mismatch.benchmark.datasets.draw_split`,
   for every policy but ``even``; with ``start_placement="even"``, ``K0`` evenly spaced slices for every
   policy: the painting the README advises), trained from scratch at the run's budget (the preset's);
2. every later round adds the true labels of one slice chosen by the policy, and trains again, starting
   from the previous round's model with the warm-start settings (:func:`mismatch.train.warm_start_config`);
   with ``scratch`` the same labelled slices are also trained from scratch, for comparison (not used by the
   trajectory);
3. every round segments the volume as the product does (the network plus what the painted slices imply,
   ``mismatch segment --labels``) and records IoU, Dice and ECE on every slice not labelled, the seconds of
   training and segmenting, and the slice each ranking would suggest next.

Policies (:data:`POLICIES`): ``suggested`` (the engine's default ranking, :data:`~mismatch.ranking.DEFAULT_RANKING`),
``suggested-<ranking>`` for each ranking of :data:`~mismatch.ranking.RANKINGS` (to compare them), ``even``
(the labelled slices evenly spaced over the structure's extent, for each count: the fixed schedule a careful user
would paint; not nested, each round still starts from the previous model), ``random`` (a random slice of the
structure's extent) and ``largest-gap`` (the slice of the extent farthest from any labelled one). The extent is
where the benchmark draws labelled slices: slices whose cross-section is at least 10 % of the largest (a user
knows roughly where the structure is).

The reference, per data set: ``unet-strong`` trained with every slice labelled (five times a first round's
steps, :data:`REFERENCE_STEPS_FACTOR`), evaluated (network alone) on every slice: "a model trained on every
slice". The report gives the labelled slices each policy needs to reach 95 % of its IoU, on the unlabelled
slices and on the whole volume.

Every finished round is written to ``loop.json`` at once (and the model it ends with to ``states/``), so an
interrupted simulation loses at most the round in progress and resumes from the last one; ``results.md`` and
the figures are rebuilt from ``loop.json`` alone (``--report-only``).
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import UserError
from ..ranking import DEFAULT_RANKING, RANKINGS
from .datasets import even_slices, extent
from .classical import labelled_slices_only
from .runner import AXIS_NAMES, Budget, _fmt, check_same_settings, read_json, write_json

RESULTS_FILE = "loop.json"
STATES_DIR = "states"
#: how the simulated user picks the next slice
BASE_POLICIES = ["suggested", "even", "random", "largest-gap"]
POLICIES = BASE_POLICIES + [f"suggested-{r}" for r in RANKINGS]
REFERENCE_METHOD = "unet-strong"
#: the reference trains this many times a first round's steps: at a first round's budget a U-Net trained on
#: every slice predicts nothing for a small structure (most slices and patches hold none of it; a breast lesion
#: 51.8 %, the synthetic vessels 0.0 %, a brain tumour 0.0 to 15.5 %), at five times it fits them (89.5 and
#: 89.2 %), so that "95 % of the reference" is a real ceiling
REFERENCE_STEPS_FACTOR = 5
#: where the first round's slices lie (``--start-placement``)
START_PLACEMENTS = ("draw", "even")
#: the share of the reference's IoU a policy has to reach ("slices needed")
TARGET = 0.95


@dataclass
class LoopConfig(Budget):
    """Everything a simulation depends on (the :class:`~mismatch.benchmark.runner.Budget` is a first
    training's); stored in ``loop.json``."""

    datasets: list[str] = field(default_factory=lambda: ["ctchest-lungs"])
    methods: list[str] = field(default_factory=lambda: ["mismatch", "unet-strong"])
    start: list[int] = field(default_factory=lambda: [1, 3])
    max_labelled: int = 10
    seeds: int = 5
    policies: list[str] = field(default_factory=lambda: list(BASE_POLICIES))
    # a later round: mismatch.train.WARM_START with these on top (e.g. {"steps_fraction": 0.5})
    warm: dict = field(default_factory=dict)
    scratch: bool = False
    reference: bool = True
    dataset_options: dict[str, dict] = field(default_factory=dict)
    data_dir: str | None = None
    device: str = "auto"
    # the first round's slices for every policy but ``even``: "draw" (the benchmark's random draw) or "even"
    start_placement: str = "draw"

    def warm_config(self, method: str, **overrides):
        from ..train import warm_start_config

        return warm_start_config(self.train_config(method, **overrides), self.warm)

    def settings(self) -> dict:
        """What makes two simulations' rounds comparable (checked when ``loop.json`` is resumed)."""
        from ..train import WARM_START

        w = self.warm_config("mismatch")
        return {**self.budget_settings(), "warm": {**WARM_START, **self.warm}, "warm_steps": w.steps,
                "warm_lr": w.lr, **({"start_placement": self.start_placement} if self.start_placement != "draw"
                                    else {})}


def check_config(config: LoopConfig, extra_datasets: Sequence[str] = ()) -> None:
    """:class:`UserError` for settings that cannot run, before any work."""
    from ..data import check_patch_size
    from ..methods import METHODS
    from .datasets import DATASETS

    unknown = [p for p in config.policies if p not in POLICIES]
    if unknown:
        raise UserError(f"unknown policy(ies) {', '.join(unknown)}; choose from {', '.join(POLICIES)}")
    unknown = [m for m in config.methods if m not in METHODS]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(sorted(METHODS))}")
    unknown = [d for d in config.datasets if d not in DATASETS and d not in extra_datasets
               and d not in config.dataset_options]
    if unknown:
        raise UserError(f"unknown data set(s) {', '.join(unknown)}; choose from {', '.join(DATASETS)}")
    if config.start_placement not in START_PLACEMENTS:
        raise UserError(f"--start-placement {config.start_placement}: choose {' or '.join(START_PLACEMENTS)}")
    if not config.start or min(config.start) < 1:
        raise UserError("--start: give labelled-slice counts of at least 1")
    if config.max_labelled < max(config.start):
        raise UserError(f"--max-labelled {config.max_labelled} is below --start {max(config.start)}")
    check_patch_size(config.patch_size)


# -- the policies ---------------------------------------------------------------------------------------------

def largest_gap_slice(candidates: Sequence[int], labelled: Sequence[int]) -> int | None:
    """The slice of the extent ``[min(candidates), max(candidates)]`` farthest from any labelled slice (the
    lowest on a tie); None when every slice there is labelled."""
    lo, hi = int(min(candidates)), int(max(candidates))
    lab = np.asarray(sorted(labelled), dtype=np.int64)
    free = [s for s in range(lo, hi + 1) if s not in set(lab.tolist())]
    if not free:
        return None
    if len(lab) == 0:
        return free[len(free) // 2]
    return max(free, key=lambda s: (int(np.min(np.abs(lab - s))), -s))


def random_slice(candidates: Sequence[int], labelled: Sequence[int], n_slices: int, seed: int, n: int) -> int | None:
    """A random unlabelled slice of the extent (any unlabelled slice once the extent is all labelled),
    deterministic in ``(seed, n)``."""
    rng = np.random.default_rng([int(seed), int(n), 7])
    taken = set(int(s) for s in labelled)
    free = [int(s) for s in candidates if int(s) not in taken] or \
        [s for s in range(n_slices) if s not in taken]
    return int(rng.choice(free)) if free else None


def suggestions(slice_scores: list[dict], labelled: Sequence[int], two_decoders: bool) -> dict[str, int | None]:
    """The slice each ranking of :data:`~mismatch.ranking.RANKINGS` puts first (None when none is left)."""
    from ..ranking import rank_uncertain_slices

    out = {}
    for name in RANKINGS:
        ranked = rank_uncertain_slices(slice_scores, exclude=labelled, two_decoders=two_decoders, ranking=name)
        out[name] = int(ranked[0]["slice"]) if ranked else None
    return out


def next_labelled(policy: str, labelled: Sequence[int], record: dict, candidates: Sequence[int], n_slices: int,
                  seed: int) -> list[int] | None:
    """The labelled slices of the next round under ``policy``, from the round just recorded (its
    ``suggestions``); None when the policy has nothing left to add."""
    n = len(labelled) + 1
    if policy == "even":
        return even_slices(candidates, n, n_slices) if n <= n_slices else None
    if policy == "random":
        s = random_slice(candidates, labelled, n_slices, seed, n)
    elif policy == "largest-gap":
        s = largest_gap_slice(candidates, labelled)
        if s is None:
            s = random_slice(candidates, labelled, n_slices, seed, n)
    else:
        ranking = DEFAULT_RANKING if policy == "suggested" else policy[len("suggested-"):]
        s = (record.get("suggestions") or {}).get(ranking)
    return None if s is None else sorted(set(int(x) for x in labelled) | {int(s)})


# -- one round ------------------------------------------------------------------------------------------------

def train_round(case, volume: np.ndarray, labelled: Sequence[int], train_config, device,
                init_state: dict | None = None, use_prior: bool = True,
                keep_scores: bool = False) -> tuple[dict, dict]:
    """One round: train on ``labelled`` slices of ``case`` (from ``init_state`` when given) and segment the whole
    volume as the product does (:func:`mismatch.pipeline.train_and_segment`, with the painted slices' prior when
    ``use_prior``); evaluate every other slice. Returns ``(metrics, final state)``: the weights and, under
    their ``optim.`` names, the optimiser's state, which a warm round continues from as ``mismatch train
    --init`` does. ``keep_scores``: the metrics also hold the segmentation's per-slice scores (``slice_scores``,
    what the rankings read)."""
    import torch

    from ..data import Normalisation
    from ..pipeline import train_and_segment
    from .runner import case_classes

    lab = np.asarray(sorted(int(s) for s in labelled), dtype=np.int64)
    n_slices = int(case.label.shape[case.axis])
    test = [s for s in range(n_slices) if s not in set(lab.tolist())] or list(range(n_slices))
    sparse = labelled_slices_only(case.label, lab, case.axis)
    run = train_and_segment(volume, sparse, lab, case_classes(case), train_config,
                            normalisation=Normalisation(hu_window=case.window), spacing_kji=case.spacing,
                            geometry=case.geometry, device=device, use_prior=use_prior, truth=case.label,
                            eval_slices=test, outputs=(),
                            init_state=None if init_state is None else
                            {k: v for k, v in init_state.items() if not k.startswith("optim.")},
                            init_optimizer=None if init_state is None else
                            {k: v for k, v in init_state.items() if k.startswith("optim.")})
    seg = run.segmentation
    mean = seg.evaluation["mean"]
    two = len(run.networks[0].decoders) > 1
    metrics = {
        "iou": mean["iou"], "iou_volume": volume_iou(mean["classes"], sparse), "dice": mean["dice"],
        "ece_all": mean["calibration"]["all"]["ece"], "ece_band": mean["calibration"]["band"]["ece"],
        "n_test": len(test), "steps": run.fitted.steps_done,
        "train_seconds": round(run.train_seconds, 3), "segment_seconds": round(run.segment_seconds, 3),
        "seconds": round(run.train_seconds + run.segment_seconds, 3),
        "suggestions": suggestions(seg.slice_scores, lab.tolist(), two) if use_prior else None,
    }
    if keep_scores:
        metrics["slice_scores"] = seg.slice_scores
    state = {**{k: v.detach().to("cpu") for k, v in run.fitted.snapshots[-1].items()},
             **run.fitted.optimizer_state}
    del run
    if getattr(device, "type", "") == "cuda":
        torch.cuda.empty_cache()
    return metrics, state


def volume_iou(classes: dict, sparse: np.ndarray) -> float | None:
    """The IoU of the whole volume the user ends the round with: the unlabelled slices as segmented (``classes``:
    the evaluation's per-class counts over them) and the labelled ones as painted (``sparse``: the true labels
    on those slices, counted as right), the mean over the classes."""
    ious = []
    for c, v in classes.items():
        painted = int(np.count_nonzero(sparse == int(c)))
        union = v["tp"] + v["fp"] + v["fn"] + painted
        if union:
            ious.append((v["tp"] + painted) / union)
    return float(np.mean(ious)) if ious else None


# -- bookkeeping ----------------------------------------------------------------------------------------------

def load_results(out_dir: str | os.PathLike) -> dict:
    data = read_json(Path(out_dir) / RESULTS_FILE, {"config": None, "rounds": [], "references": []})
    data.setdefault("rounds", [])
    data.setdefault("references", [])
    return data


def _save(out: Path, data: dict) -> None:
    write_json(out / RESULTS_FILE, data)


def _state_path(out: Path, name: str) -> Path:
    return out / STATES_DIR / (name.replace("|", "_").replace("/", "_") + ".pt")


def _save_state(path: Path, state: dict) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_state(path: Path) -> dict | None:
    import torch

    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:   # a torn file: the round is done again
        return None


def trajectory_key(r: dict) -> str:
    return "|".join(str(r[k]) for k in ("dataset", "case", "method", "k0", "seed", "policy"))


def _start_kind(policy: str, placement: str = "draw") -> str:
    return "even" if policy == "even" or placement == "even" else "draw"


# -- the simulation -------------------------------------------------------------------------------------------

def _cases(dataset: str, config: LoopConfig, cases: dict | None):
    if cases is not None and dataset in cases:
        return cases[dataset]
    from .datasets import load_dataset

    return load_dataset(dataset, data_dir=config.data_dir, **config.dataset_options.get(dataset, {}))


def run_reference(case, volume, config: LoopConfig, device) -> dict:
    """``unet-strong`` with every slice labelled, :data:`REFERENCE_STEPS_FACTOR` times a first round's steps,
    evaluated (network alone) on every slice."""
    n_slices = int(case.label.shape[case.axis])
    steps = config.train_config(REFERENCE_METHOD).steps * REFERENCE_STEPS_FACTOR
    cfg = replace(config, steps=steps).train_config(
        REFERENCE_METHOD, seed=0, axis=AXIS_NAMES[case.axis], checkpoint_every=10 ** 9)
    metrics, _ = train_round(case, volume, list(range(n_slices)), cfg, device, use_prior=False)
    metrics["n_test"] = n_slices
    return metrics


def run_simulation(config: LoopConfig, out_dir: str | os.PathLike, *, log: Callable[[str], None] = print,
                   cases: dict | None = None) -> dict:
    """Run every round not yet in ``out_dir/loop.json``, then write the report. Returns the JSON data.

    ``cases``: ``{data set name: [Case, ...]}`` to use instead of loading the named data sets (tests)."""
    from ..data import Normalisation
    from ..device import resolve_device
    from .datasets import draw_split
    from .runner import machine_description

    check_config(config, list(cases or {}))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_results(out)
    check_same_settings(out / RESULTS_FILE, data.get("config"), "settings", config.settings(), "rounds")
    data["config"] = {"settings": config.settings(), "simulation": asdict(config), "machine": machine_description()}
    _save(out, data)
    device = resolve_device(config.device)
    t_start = time.monotonic()

    for dataset in config.datasets:
        for case in _cases(dataset, config, cases):
            volume = Normalisation(hu_window=case.window).apply(case.image)
            n_slices = int(case.label.shape[case.axis])
            candidates = extent(case.label, case.axis)
            base = {"dataset": dataset, "case": case.name, "synthetic": bool(case.synthetic), "n_slices": n_slices}
            if config.reference and not any(r["dataset"] == dataset and r["case"] == case.name
                                            for r in data["references"]):
                log(f"{dataset}: the reference ({REFERENCE_METHOD}, every slice labelled)")
                metrics = run_reference(case, volume, config, device)
                data["references"].append({**base, "method": REFERENCE_METHOD, **metrics})
                _save(out, data)
                log(f"{dataset}: reference IoU {metrics['iou']:.3f} ({metrics['seconds']:.0f} s)")
            for method in config.methods:
                for k0 in config.start:
                    for seed in range(config.seeds):
                        for policy in config.policies:
                            spec = {**base, "method": method, "k0": int(k0), "seed": int(seed), "policy": policy}
                            _run_trajectory(spec, case, volume, candidates, config, data, out, device, log,
                                            lambda: draw_split(case.label, case.axis, k0, seed)[0].tolist(),
                                            t_start)
                        for start in ("draw", "even"):   # every policy has its first round: drop the models
                            shared = _state_path(out, "|".join(str(x) for x in (dataset, case.name, method, k0,
                                                                                   seed)) + f"|start-{start}")
                            if shared.exists():
                                shared.unlink()
    write_report(data, out)
    log(f"wrote {out / 'results.md'} and the figures; every round is in {out / RESULTS_FILE}")
    return data


def _run_trajectory(spec: dict, case, volume, candidates, config: LoopConfig, data: dict, out: Path, device, log,
                    draw: Callable[[], list[int]], t_start: float) -> None:
    key = trajectory_key(spec)
    n_slices = spec["n_slices"]
    rounds = sorted((r for r in data["rounds"] if trajectory_key(r) == key and r["init"] != "scratch"),
                    key=lambda r: r["n_labelled"])
    axis = AXIS_NAMES[case.axis]
    seed = spec["seed"]
    start = _start_kind(spec["policy"], config.start_placement)
    shared_name = "|".join(str(spec[k]) for k in ("dataset", "case", "method", "k0", "seed")) + f"|start-{start}"

    def describe(n: int, init: str) -> str:
        return (f"{spec['dataset']} {spec['method']} K0={spec['k0']} seed {seed} {spec['policy']}: "
                f"{n} labelled ({init})")

    def record(metrics: dict, labelled: list[int], added, init: str, state: dict | None, name: str | None) -> dict:
        if state is not None and name is not None:
            _save_state(_state_path(out, name), state)   # first the model, then the round that names it
        row = {**spec, "n_labelled": len(labelled), "labelled_slices": list(labelled), "added": added,
               "init": init, **metrics}
        data["rounds"].append(row)
        _save(out, data)
        log(f"{describe(len(labelled), init)}: IoU {metrics['iou']:.3f}, train {metrics['train_seconds']:.1f} s "
            f"({time.monotonic() - t_start:.0f} s elapsed)")
        return row

    def round_name(n: int) -> str:
        return key + f"|n{n}"

    if rounds and (rounds[-1]["n_labelled"] >= config.max_labelled or rounds[-1].get("last")):
        if config.scratch:
            _scratch_missing(spec, key, rounds, case, volume, config, data, out, device, log, axis)
        return
    # where to start: the last recorded round whose model is on disk
    state = None
    while rounds:
        state = _load_state(_state_path(out, round_name(rounds[-1]["n_labelled"])))
        if state is not None:
            break
        log(f"{describe(rounds[-1]['n_labelled'], 'resume')}: its model is missing; doing the round again")
        data["rounds"].remove(rounds.pop())
    if not rounds:
        # round 0: shared by every policy with the same start (trained once)
        shared = next((r for r in data["rounds"] if r.get("shared_name") == shared_name and r["init"] == "first"),
                      None)
        shared_state = _load_state(_state_path(out, shared_name)) if shared is not None else None
        if shared is not None and shared_state is not None:
            metrics = {k: v for k, v in shared.items() if k not in spec and k not in
                       ("n_labelled", "labelled_slices", "added", "init", "shared_name", "copied_from", "last")}
            metrics["copied_from"] = shared["policy"]
            labelled = list(shared["labelled_slices"])
            state = shared_state
            log(f"{describe(len(labelled), 'first')}: shared with {shared['policy']}")
        else:
            labelled = even_slices(candidates, spec["k0"], n_slices) if start == "even" else sorted(draw())
            cfg = config.train_config(spec["method"], seed=seed, axis=axis, checkpoint_every=10 ** 9)
            metrics, state = train_round(case, volume, labelled, cfg, device)
            _save_state(_state_path(out, shared_name), state)
            metrics["shared_name"] = shared_name
        metrics.setdefault("shared_name", shared_name)
        rounds.append(record(metrics, labelled, None, "first", state, round_name(len(labelled))))
    if config.scratch:
        _scratch_missing(spec, key, rounds, case, volume, config, data, out, device, log, axis)
    while rounds[-1]["n_labelled"] < config.max_labelled:
        last = rounds[-1]
        labelled = next_labelled(spec["policy"], last["labelled_slices"], last, candidates, n_slices, seed)
        if labelled is None or len(labelled) <= len(last["labelled_slices"]):
            log(f"{describe(last['n_labelled'], 'end')}: the policy has no slice left to add")
            last["last"] = True
            _save(out, data)
            break
        added = sorted(set(labelled) - set(last["labelled_slices"]))
        n = len(labelled)
        cfg = config.warm_config(spec["method"], seed=seed * 1000 + n, axis=axis, checkpoint_every=10 ** 9)
        metrics, new_state = train_round(case, volume, labelled, cfg, device, init_state=state)
        rounds.append(record(metrics, labelled, added[0] if len(added) == 1 else added, "warm", new_state,
                             round_name(n)))
        old = _state_path(out, round_name(last["n_labelled"]))
        if old.exists():
            old.unlink()
        state = new_state
        if config.scratch:
            _scratch_missing(spec, key, rounds, case, volume, config, data, out, device, log, axis)
    done = _state_path(out, round_name(rounds[-1]["n_labelled"]))   # the trajectory is complete
    if done.exists():
        done.unlink()


def _scratch_missing(spec, key, rounds, case, volume, config, data, out, device, log, axis) -> None:
    """Train from scratch on the labelled slices of every warm round of the trajectory that has no scratch run."""
    done = {r["n_labelled"] for r in data["rounds"] if trajectory_key(r) == key and r["init"] == "scratch"}
    for r in rounds:
        if r["init"] != "warm" or r["n_labelled"] in done:
            continue
        cfg = config.train_config(spec["method"], seed=spec["seed"] * 1000 + r["n_labelled"], axis=axis,
                                  checkpoint_every=10 ** 9)
        metrics, _ = train_round(case, volume, r["labelled_slices"], cfg, device)
        data["rounds"].append({**spec, "n_labelled": r["n_labelled"], "labelled_slices": r["labelled_slices"],
                               "added": r["added"], "init": "scratch", **metrics})
        _save(out, data)
        log(f"{spec['dataset']} {spec['method']} K0={spec['k0']} seed {spec['seed']} {spec['policy']}: "
            f"{r['n_labelled']} labelled (scratch): IoU {metrics['iou']:.3f}, train {metrics['train_seconds']:.1f} s")


# -- the report -----------------------------------------------------------------------------------------------

def curves(rounds: list[dict], key: str = "iou") -> dict:
    """``{(dataset, method, k0, policy): {n_labelled: {seed: value}}}`` of the trajectories (first and warm
    rounds): ``key`` ``iou`` (the unlabelled slices) or ``iou_volume`` (the whole volume, :func:`volume_iou`)."""
    out: dict = defaultdict(lambda: defaultdict(dict))
    for r in rounds:
        if r["init"] in ("first", "warm") and r.get(key) is not None:
            out[(r["dataset"], r["method"], r["k0"], r["policy"])][r["n_labelled"]][(r["case"], r["seed"])] = r[key]
    return out


def mean_over_rounds(by_n: dict[int, dict], ns: Sequence[int]) -> list[float]:
    """Per trajectory (case, seed) of a curve ``{n_labelled: {run: value}}``: the mean of its values over the
    counts ``ns`` it has (the area under its curve divided by its rounds)."""
    runs = sorted({run for per in by_n.values() for run in per})
    return [float(np.mean([by_n[n][run] for n in ns if run in by_n.get(n, {})])) for run in runs]


def slices_needed(by_n: dict[int, dict], target: float) -> dict:
    """For each trajectory (case, seed) of a curve: the fewest labelled slices with IoU >= ``target`` (None:
    not reached within the rounds run)."""
    runs = {run for per in by_n.values() for run in per}
    out = {}
    for run in runs:
        reached = [n for n in sorted(by_n) if by_n[n].get(run) is not None and by_n[n][run] >= target]
        out[run] = reached[0] if reached else None
    return out


def _needed(by_n: dict[int, dict], target: float | None, max_n: int) -> list[int]:
    """:func:`slices_needed` per trajectory, ``max_n + 1`` for one that never got there; empty without a target."""
    if target is None:
        return []
    return [v if v is not None else max_n + 1 for v in slices_needed(by_n, target).values()]


def _needed_text(need: list[int], max_n: int) -> str:
    """The mean of :func:`_needed`'s counts, and how many runs never reached the target ('–' without one)."""
    if not need:
        return "–"
    unreached = sum(1 for v in need if v > max_n)
    return f"{np.mean(need):.1f}" + (f" ({unreached} >{max_n})" if unreached else "")


def _policy_table(by_policy: dict[str, dict], ns: Sequence[int], target: float | None, max_n: int) -> list[str]:
    """A Markdown table of curves ``{policy: {n_labelled: {run: IoU}}}``: per policy the IoU % at each count,
    the mean over the rounds and the slices needed to reach ``target``, each with its p against ``even``."""
    stats = {p: (mean_over_rounds(by_n, ns), _needed(by_n, target, max_n)) for p, by_n in by_policy.items()}
    even_auc, even_need = stats.get("even", ([], []))
    lines = ["| policy | " + " | ".join(str(n) for n in ns) + " | mean IoU over rounds | p vs even | slices needed | "
             "p vs even |", "|---|" + "---:|" * (len(ns) + 4)]
    for p, by_n in by_policy.items():
        auc, need = stats[p]
        cells = [_fmt(list(by_n[n].values())) if n in by_n else "" for n in ns]
        p_auc = _p(auc, even_auc) if even_auc and p != "even" else ""
        p_need = _p(need, even_need) if even_need and need and p != "even" else ""
        lines.append(f"| {p} | " + " | ".join(cells) + f" | {_fmt(auc)} | {p_auc} | {_needed_text(need, max_n)} | "
                     f"{p_need} |")
    return lines


def _p(a, b) -> str:
    from .stats import mann_whitney_p

    p = mann_whitney_p(a, b)
    return "–" if p != p else f"{p:.3f}"


def write_report(data: dict, out_dir: str | os.PathLike) -> Path:
    """``results.md`` and one figure per data set, method and start count (``loop-<data set>-<method>-k<K0>.png``),
    from ``data`` alone."""
    out = Path(out_dir)
    rounds = data.get("rounds") or []
    refs = {r["dataset"]: r for r in data.get("references") or []}
    cfg = data.get("config") or {}
    lines = ["# The annotate-and-retrain loop, simulated", ""]
    if cfg:
        lines += [f"Settings: `{json.dumps(cfg.get('settings'))}`. Machine: `{json.dumps(cfg.get('machine'))}`.", ""]
    lines += ["Each round adds the true labels of one slice chosen by the policy and trains again from the previous "
              "round's model (warm start); the IoU is the product's result (network plus the painted slices' "
              "prior) pooled over every slice not labelled. p: two-sided Mann-Whitney U over the seeds against "
              "`even` (with 5 against 5 runs the smallest p is 0.008). Mean IoU over rounds: the area under the "
              f"curve divided by the rounds. Slices needed: the fewest labelled slices with IoU >= {TARGET:.0%} of "
              "the reference (a strong U-Net trained on every slice, network alone, evaluated on every slice); "
              "'>N' where a run never reached it.", ""]
    placement = (cfg.get("simulation") or {}).get("start_placement", "draw")
    lines += [("The first round's slices: evenly spaced over the structure's extent for every policy (the painting "
               "the README advises)." if placement == "even" else
               "The first round's slices: drawn at random over the structure's extent (the benchmark's draw), "
               "for every policy but `even`, which starts from its own evenly spaced slices."), ""]
    if any(r.get("synthetic") for r in rounds):
        lines += ["Data sets named `synthetic-*` are SYNTHETIC (the generated vessel phantom).", ""]
    if refs:
        lines += ["## Reference: every slice labelled", "", "| data set | method | IoU % | steps | train s |",
                  "|---|---|---:|---:|---:|"]
        for d, r in refs.items():
            lines.append(f"| {d} | {r['method']} | {100 * r['iou']:.1f} | {r.get('steps', '–')} | "
                         f"{r['train_seconds']:.0f} |")
        lines.append("")
    cv, vol = curves(rounds), curves(rounds, "iou_volume")
    figures = []
    groups = sorted({(d, m, k) for d, m, k, _ in cv})
    for d, m, k in groups:
        policies = [p for (dd, mm, kk, p) in cv if (dd, mm, kk) == (d, m, k)]
        policies.sort(key=lambda p: (POLICIES.index(p) if p in POLICIES else 99, p))
        ns = sorted({n for p in policies for n in cv[(d, m, k, p)]})
        ref = refs.get(d, {}).get("iou")
        target = TARGET * ref if ref is not None else None
        max_n = max(ns) if ns else 0
        lines += [f"## {d}, {m}, starting from {k} labelled slice{'s' if k != 1 else ''}", ""]
        lines += ["IoU % (mean ± std over the seeds) against the number of labelled slices:", "",
                  *_policy_table({p: cv[(d, m, k, p)] for p in policies}, ns, target, max_n), ""]
        if "even" in policies:
            lines += ["Per count against `even` (p, Mann-Whitney over the seeds):", "",
                      "| policy | " + " | ".join(str(n) for n in ns) + " |", "|---|" + "---:|" * len(ns)]
            for p in policies:
                if p == "even":
                    continue
                a, b = cv[(d, m, k, p)], cv[(d, m, k, "even")]
                lines.append(f"| {p} | " + " | ".join(_p(list(a.get(n, {}).values()), list(b.get(n, {}).values()))
                                                       for n in ns) + " |")
            lines.append("")
        with_volume = {p: vol[(d, m, k, p)] for p in policies if (d, m, k, p) in vol}
        if with_volume:
            lines += ["The whole volume the user has after each round (the painted slices as painted, the others as "
                      "segmented), IoU %, and the labelled slices it needs to reach "
                      f"{TARGET:.0%} of the reference (whose IoU is also over the whole volume):", "",
                      *_policy_table(with_volume, ns, target, max_n), ""]
        path = _figure(cv, d, m, k, policies, ns, ref, out)
        if path is not None:
            figures.append(path.name)
            lines += [f"![{path.name}]({path.name})", ""]
    lines += ["## Seconds per round", "", time_table(rounds), ""]
    lines += ["## Warm start against training from scratch on the same slices", "", warm_table(rounds), ""]
    path = out / "results.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def time_table(rounds: list[dict]) -> str:
    """Training and segmenting seconds per round: the first training, the warm rounds, from scratch."""
    acc = defaultdict(lambda: defaultdict(list))
    for r in rounds:
        if r.get("copied_from"):   # a shared first round, counted once
            continue
        acc[(r["dataset"], r["method"])][r["init"]].append(r)
    if not acc:
        return "_No rounds._"
    lines = ["| data set | method | first training s | warm round s | warm / first | from scratch s | "
             "segment s | steps first / warm |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for (d, m), per in sorted(acc.items()):
        def mean(init, key):
            v = [r[key] for r in per.get(init, []) if r.get(key) is not None]
            return float(np.mean(v)) if v else None

        first, warm, scratch = mean("first", "train_seconds"), mean("warm", "train_seconds"), \
            mean("scratch", "train_seconds")
        seg = mean("warm", "segment_seconds") or mean("first", "segment_seconds")
        steps_f, steps_w = mean("first", "steps"), mean("warm", "steps")
        ratio = f"{warm / first:.2f}" if first and warm else "–"
        f = lambda v: "–" if v is None else f"{v:.1f}"   # noqa: E731
        steps = f"{steps_f:.0f} / {steps_w:.0f}" if steps_f and steps_w else "–"
        lines.append(f"| {d} | {m} | {f(first)} | {f(warm)} | {ratio} | {f(scratch)} | {f(seg)} | {steps} |")
    return "\n".join(lines)


def warm_table(rounds: list[dict]) -> str:
    """IoU of each warm round against the from-scratch run on the same labelled slices (``--scratch``)."""
    scratch = {(trajectory_key(r), r["n_labelled"]): r for r in rounds if r["init"] == "scratch"}
    pairs = defaultdict(list)
    for r in rounds:
        s = scratch.get((trajectory_key(r), r["n_labelled"]))
        if r["init"] == "warm" and s is not None:
            pairs[(r["dataset"], r["method"])].append((r, s))
    if not pairs:
        return "_No from-scratch runs (run with --scratch)._"
    lines = ["Pairs pooled over policies, seeds and rounds (they are not independent: read p as a guide).", "",
             "| data set | method | pairs | IoU % warm | IoU % scratch | Δ points | p | train s warm / scratch |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for (d, m), ps in sorted(pairs.items()):
        w = [a["iou"] for a, _ in ps]
        s = [b["iou"] for _, b in ps]
        tw = float(np.mean([a["train_seconds"] for a, _ in ps]))
        ts = float(np.mean([b["train_seconds"] for _, b in ps]))
        lines.append(f"| {d} | {m} | {len(ps)} | {_fmt(w)} | {_fmt(s)} | {100 * (np.mean(w) - np.mean(s)):+.1f} | "
                     f"{_p(w, s)} | {tw:.1f} / {ts:.1f} |")
    return "\n".join(lines)


def _figure(cv, dataset, method, k0, policies, ns, ref, out: Path) -> Path | None:
    from ..plots import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    drawn = False
    for p in policies:
        by_n = cv[(dataset, method, k0, p)]
        xs = [n for n in ns if by_n.get(n)]
        if not xs:
            continue
        means = np.array([np.mean(list(by_n[n].values())) for n in xs])
        stds = np.array([np.std(list(by_n[n].values())) for n in xs])
        ax.plot(xs, 100 * means, marker="o", markersize=3, label=p, linewidth=2 if p.startswith("suggested") else 1.2)
        ax.fill_between(xs, 100 * (means - stds), 100 * (means + stds), alpha=0.07)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    if ref is not None:
        ax.axhline(100 * TARGET * ref, color="gray", linestyle="--", linewidth=1,
                   label=f"{TARGET:.0%} of every slice labelled")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("labelled slices")
    ax.set_ylabel("IoU % on the other slices")
    ax.set_title(f"{dataset}, {method}, from {k0}", fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    ax.grid(alpha=0.3)
    return _save(fig, out / f"loop-{dataset}-{method}-k{k0}.png", 120)
