"""measurements/ablate_prior.py's --network-clip probe: the network's log-odds capped before the prior is added,
and the engine's fusion left as it was afterwards."""

import torch
from measurement_scripts import load_script

import mismatch.inference as inference


def _script():
    return load_script("ablate_prior")


def test_network_clipped_caps_binary_log_odds_and_restores_the_fusion(monkeypatch):
    seen = []
    monkeypatch.setattr(inference, "_fuse", lambda mean, prior, slices, binary: seen.append(mean) or mean)
    recorder = inference._fuse
    probs = torch.tensor([1 - 1e-7, 0.9, 0.5, 1e-9]).view(1, 1, 2, 2)
    with _script().network_clipped(2.0):
        inference._fuse(probs, None, range(1), True)
        inference._fuse(probs, None, range(1), False)   # multi-class: untouched
    assert inference._fuse is recorder
    clipped = torch.logit(seen[0]).flatten()
    assert torch.allclose(clipped, torch.tensor([2.0, 2.0, 0.0, -2.0]), atol=1e-5)
    assert torch.equal(seen[1], probs)


def test_files_are_ablated_as_the_benchmark_names_them(tmp_path):
    """``--files IMAGE LABELS``: a volume of one's own, named as ``mismatch benchmark --files`` names it, scored
    with the default prior and each variant (and only it, when no ``--datasets`` are given)."""
    import json

    import numpy as np

    from mismatch.io import Geometry, write_volume

    rng = np.random.default_rng(0)
    label = np.zeros((8, 24, 24), np.uint8)
    label[1:7, 8:16, 6:18] = 1
    image = (label * 2.0 + rng.normal(0, 0.3, label.shape)).astype(np.float32)
    geometry = Geometry((24, 24, 8), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    write_volume(image, geometry, tmp_path / "mine.nrrd")
    write_volume(label, geometry, tmp_path / "mine-label.nrrd")
    out = tmp_path / "ablation.json"
    assert _script().main(["--files", str(tmp_path / "mine.nrrd"), str(tmp_path / "mine-label.nrrd"),
                           "--placement", "even", "--labelled", "2", "--seeds", "100", "--steps", "2",
                           "--variant", "reach1", '{"boundary_reach": 1}', "--out", str(out)]) in (0, None)
    rows = json.loads(out.read_text())
    assert {(r["dataset"], r["variant"]) for r in rows} == {("file-mine", "default"), ("file-mine", "reach1")}
    assert all(0.0 <= r["iou"] <= 1.0 for r in rows)
