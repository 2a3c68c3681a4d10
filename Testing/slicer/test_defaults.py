"""The panel's training defaults are the engine's: ``mismatch.train.TrainConfig()`` is what ``mismatch train``
gives without options, and what a user of the panel should get without touching the Training section.

Three places hold them on the module's side: ``TrainingRequest`` (scripts, the batch-mode logic), the
parameter node's field defaults (a new scene) and the .ui spin boxes (what Designer shows before the parameter
node is bound). All three must equal the engine's, so this test fails as soon as either side changes alone.
"""

from __future__ import annotations

import dataclasses

import pytest

from conftest import import_engine
from test_ui import parameter_fields, prop, ui_widgets

from MisMatchSegmentationLib.logic import METHODS, TrainingRequest

# parameter-node field -> (TrainingRequest field, TrainConfig field)
FIELDS = {"steps": ("steps", "steps"), "learningRate": ("learning_rate", "lr"), "alpha": ("alpha", "alpha"),
          "batchSize": ("batch_size", "batch_size"), "patchSize": ("patch_size", "patch_size"),
          "width": ("width", "width")}


@pytest.fixture(scope="module")
def engine_defaults():
    import_engine()   # skips without torch; a broken engine fails
    from mismatch.train import TrainConfig

    return TrainConfig()


def request_defaults() -> dict:
    return {f.name: f.default for f in dataclasses.fields(TrainingRequest) if f.default is not dataclasses.MISSING}


def test_training_request_defaults_are_the_engines(engine_defaults):
    defaults = request_defaults()
    for request_field, config_field in FIELDS.values():
        assert defaults[request_field] == pytest.approx(getattr(engine_defaults, config_field)), \
            f"TrainingRequest.{request_field} = {defaults[request_field]}, engine {config_field} = " \
            f"{getattr(engine_defaults, config_field)}"
    assert METHODS.get(defaults["method"], defaults["method"]) == engine_defaults.method


def test_parameter_node_defaults_are_the_engines(engine_defaults):
    fields = parameter_fields()
    for name, (_, config_field) in FIELDS.items():
        wanted = getattr(engine_defaults, config_field)
        assert fields[name]["default"] == pytest.approx(wanted), \
            f"parameter {name} defaults to {fields[name]['default']}, the engine's {config_field} to {wanted}"
        low, high = fields[name]["range"]
        assert low <= wanted <= high, f"parameter {name}: the engine's default {wanted} is outside its range"
    assert METHODS[fields["method"]["default"]] == engine_defaults.method


def test_ui_spin_boxes_show_the_engines_defaults(engine_defaults):
    bound = {prop(w, "SlicerParameterName"): w for w in ui_widgets().values()}
    for name, (_, config_field) in FIELDS.items():
        widget = bound[name]
        wanted = getattr(engine_defaults, config_field)
        assert prop(widget, "value") == pytest.approx(wanted), \
            f"{widget.get('name')} shows {prop(widget, 'value')}, the engine's {config_field} is {wanted}"
