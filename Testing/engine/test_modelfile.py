"""Model folders: round trip, validation of the card and the checksum; no pickle anywhere."""

import json

import pytest
import torch

from mismatch.errors import UserError
from mismatch.modelfile import load_model, read_card, save_model
from mismatch.models import build_model


def _card(net):
    return {"architecture": net.config.to_dict(), "classes": [{"value": 1, "name": "tumour", "color": [1, 0, 0]}],
            "channels": [{"name": "t1.nrrd"}], "normalisation": {"method": "zscore", "hu_window": None},
            "slice_axis": "k"}


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    nets = [build_model("mismatch", width=4), build_model("mismatch", width=4)]
    save_model(tmp_path / "m", [n.state_dict() for n in nets], _card(nets[0]))
    return tmp_path / "m", nets


def test_round_trip_keeps_every_snapshot_and_the_card(saved):
    folder, nets = saved
    card, loaded = load_model(folder)
    assert card["weights"]["snapshots"] == 2 and len(loaded) == 2
    assert card["classes"][0]["name"] == "tumour" and card["engine_version"]
    x = torch.randn(1, 1, 16, 16)
    for a, b in zip(nets, loaded):
        torch.testing.assert_close(a.eval()(x)[1], b(x)[1])
    assert not any(p.suffix in (".pt", ".pth", ".pkl") for p in folder.iterdir())


def test_corrupted_weights_are_refused(saved):
    folder, _ = saved
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError, match="checksum"):
        load_model(folder)


def test_card_that_does_not_match_the_weights_is_refused(saved):
    folder, _ = saved
    card = json.loads((folder / "model.json").read_text())
    card["architecture"]["width"] = 8
    (folder / "model.json").write_text(json.dumps(card))
    with pytest.raises(UserError, match="do not fit"):
        load_model(folder)


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.pop("classes"), "lacks classes"),
    (lambda c: c.update(format="something-else"), "not a MisMatch model"),
    (lambda c: c.update(format_version=99), "newer"),
    (lambda c: c["architecture"].update(name="resnet"), "unknown architecture"),
    (lambda c: c["architecture"].update(side_ratio=[1.0, 0.25, 0.125]), "side_ratio is .* train the model again"),
])
def test_invalid_cards_are_refused_with_a_clear_message(saved, edit, match):
    folder, _ = saved
    card = json.loads((folder / "model.json").read_text())
    edit(card)
    (folder / "model.json").write_text(json.dumps(card))
    with pytest.raises(UserError, match=match):
        read_card(folder)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(UserError, match="not a MisMatch model folder"):
        load_model(tmp_path)


@pytest.mark.parametrize("axis", ["k", "j", "i"])
def test_painted_slices_round_trip_along_any_axis(tmp_path, axis):
    """The painted slices kept with a model give back the painted label map (values above 255 too, an
    empty-listed slice as all zero) and the fingerprint of the image they were painted on; a damaged file
    reads as none (segment then needs --labels, as for a model of an earlier engine)."""
    import numpy as np

    from mismatch.data import axis_index
    from mismatch.modelfile import PaintedSlices, image_fingerprint, read_painted

    rng = np.random.default_rng(0)
    labels = np.zeros((6, 7, 8), np.int32)
    image = rng.normal(size=(2, 6, 7, 8)).astype(np.float32)
    index = [slice(None)] * 3
    for s, value in ((1, 300), (4, 2)):
        index[axis_index(axis)] = s
        labels[tuple(index)] = np.where(rng.random(labels[tuple(index)].shape) > 0.5, value, 0)
    painted = PaintedSlices.take(labels, image, axis, [1, 3, 4])   # slice 3: listed as empty
    torch.manual_seed(0)
    net = build_model("unet", width=4)
    save_model(tmp_path / "m", [net.state_dict()], _card(net), painted=painted)
    back = read_painted(tmp_path / "m")
    assert back.axis == axis and back.slices.tolist() == [1, 3, 4]
    np.testing.assert_array_equal(back.label_map(labels.shape), labels)
    assert back.image_sha256 == image_fingerprint(image, axis, [1, 3, 4])
    at = [1, 0, 0, 0]
    at[1 + axis_index(axis)] = 2   # a voxel off the painted slices: still the image they were painted on
    image[tuple(at)] += 1.0
    assert image_fingerprint(image, axis, [1, 3, 4]) == back.image_sha256
    at[1 + axis_index(axis)] = 3   # one on a painted (here empty-listed) slice: another image
    image[tuple(at)] += 1.0
    assert image_fingerprint(image, axis, [1, 3, 4]) != back.image_sha256
    (tmp_path / "m" / "painted.safetensors").write_bytes(b"damaged")
    assert read_painted(tmp_path / "m") is None
