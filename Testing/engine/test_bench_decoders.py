"""measurements/bench_decoders.py: times every part of both networks and writes them, on a tiny slice."""

import json

from measurement_scripts import load_script


def test_bench_decoders_times_the_encoder_and_each_decoder_of_both_networks(tmp_path, capsys):
    bench = load_script("bench_decoders")
    out = tmp_path / "decoders.json"
    assert bench.main(["--size", "32", "--width", "4", "--threads", "1", "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    unet, mismatch = result["networks"]["unet"], result["networks"]["mismatch"]
    assert [p for p in unet if p.startswith("decoder")] == ["decoder 0 (plain)"]
    assert [p for p in mismatch if p.startswith("decoder")] == ["decoder 0 (positive)", "decoder 1 (negative)"]
    for parts in (unet, mismatch):
        assert parts["encoder"] > 0 and parts["whole"] >= parts["encoder"]
    assert result["ratio"] == mismatch["whole"] / unet["whole"]
    assert sorted(map(int, result["conv3x3"])) == [8, 16, 24, 32, 48]
    assert "ratio MisMatch / U-Net" in capsys.readouterr().out
