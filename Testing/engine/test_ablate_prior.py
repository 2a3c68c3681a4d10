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
