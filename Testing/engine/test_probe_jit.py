"""measurements/probe_jit.py: times both networks eager and through TorchScript, on a tiny slice."""

import json

from measurement_scripts import load_script


def test_probe_jit_times_both_networks_three_ways_and_checks_the_outputs(tmp_path, capsys):
    probe = load_script("probe_jit")
    out = tmp_path / "jit.json"
    assert probe.main(["--size", "32", "--width", "4", "--threads", "1", "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    ways = ["eager", "frozen", "optimize_for_inference"]
    for name in ("unet", "mismatch"):
        assert list(result["ms"][name]) == ways and all(ms > 0 for ms in result["ms"][name].values())
        assert result["max_abs_difference"][name]["eager"] == 0.0
        assert all(d < 1e-3 for d in result["max_abs_difference"][name].values())   # the same network
    assert result["ratio"]["eager"] == result["ms"]["mismatch"]["eager"] / result["ms"]["unet"]["eager"]
    assert "ratio MisMatch / U-Net" in capsys.readouterr().out
