"""Loss curve and reliability diagrams as MRML table, plot series and plot chart nodes.

Slicer saves these with the scene and shows them in any plot view; the panel shows the chart in its own
plot widget. The reliability diagram follows the paper's Fig. 4: per confidence bin, the fraction of voxels
that are right (accuracy) against the mean confidence, one series per decoder and their mean, and the
diagonal of perfect calibration; the expected calibration error (ECE) is in the title.
"""

from __future__ import annotations

import math

import vtk

import slicer

LOSS_CHART = "MisMatch training loss"
RELIABILITY_CHART = "MisMatch reliability"
SERIES_COLOURS = {"loss": (0.1, 0.1, 0.1), "dice": (0.85, 0.33, 0.1), "consistency": (0.0, 0.45, 0.74),
                  "mean": (0.1, 0.1, 0.1), "positive_decoder": (0.85, 0.33, 0.1),
                  "negative_decoder": (0.0, 0.45, 0.74), "ideal": (0.6, 0.6, 0.6)}
DECODER_LABELS = {"mean": "mean of decoders", "positive_decoder": "positive decoder",
                  "negative_decoder": "negative decoder"}


def _node(cls: str, name: str, existing=None):
    scene = slicer.mrmlScene
    if existing is not None and existing.GetScene() is scene:
        return existing
    node = scene.GetFirstNodeByName(name)
    if node is not None and node.IsA(cls):
        return node
    return scene.AddNewNodeByClass(cls, name)


def _fill_table(table_node, columns: dict[str, list[float]]) -> None:
    table = vtk.vtkTable()
    for name, values in columns.items():
        array = vtk.vtkDoubleArray()
        array.SetName(name)
        array.SetNumberOfValues(len(values))
        for n, v in enumerate(values):
            array.SetValue(n, float("nan") if v is None else float(v))
        table.AddColumn(array)
    table_node.SetAndObserveTable(table)


def _series(name: str, table_node, x: str, y: str, colour, dashed: bool = False, markers: bool = False):
    series = _node("vtkMRMLPlotSeriesNode", name)
    series.SetAndObserveTableNodeID(table_node.GetID())
    series.SetXColumnName(x)
    series.SetYColumnName(y)
    series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
    series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle if markers
                          else slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
    series.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleDash if dashed
                        else slicer.vtkMRMLPlotSeriesNode.LineStyleSolid)
    series.SetColor(*colour)
    return series


def _chart(name: str, series_nodes, title: str, x_title: str, y_title: str, chart=None):
    chart = _node("vtkMRMLPlotChartNode", name, chart)
    chart.RemoveAllPlotSeriesNodeIDs()
    for s in series_nodes:
        chart.AddAndObservePlotSeriesNodeID(s.GetID())
    chart.SetTitle(title)
    chart.SetXAxisTitle(x_title)
    chart.SetYAxisTitle(y_title)
    chart.SetLegendVisibility(True)
    return chart


class LossCurve:
    """Collects ``progress`` events and keeps a table + series + chart up to date (one row per event)."""

    def __init__(self, chart=None):
        self.steps: list[int] = []
        self.columns: dict[str, list[float]] = {"loss": []}
        self.chart = chart
        self.table = None

    def reset(self) -> None:
        self.steps, self.columns = [], {"loss": []}

    def add(self, event: dict) -> None:
        if event.get("event") != "progress" or event.get("phase") != "train" or event.get("loss") is None:
            return
        self.steps.append(int(event["step"]))
        values = {"loss": event["loss"]}
        values.update({k: v for k, v in (event.get("terms") or {}).items() if k != "alpha" and v is not None})
        for key in values:
            if key not in self.columns:
                self.columns[key] = [None] * (len(self.steps) - 1)
        for key, column in self.columns.items():
            column.append(values.get(key))

    def update_nodes(self):
        """Write the collected curve into the MRML nodes (call after a batch of events); returns the chart."""
        self.table = _node("vtkMRMLTableNode", LOSS_CHART + " table", self.table)
        _fill_table(self.table, {"step": self.steps, **self.columns})
        series = [_series(f"{LOSS_CHART}: {key}", self.table, "step", key, SERIES_COLOURS.get(key, (0.4, 0.4, 0.4)))
                  for key in self.columns]
        last = self.columns["loss"][-1] if self.steps else None
        title = "Training loss" + (f" (step {self.steps[-1]}: {last:.4f})" if last is not None else "")
        self.chart = _chart(LOSS_CHART, series, title, "step", "loss", self.chart)
        return self.chart


def reliability_bins(calibration: dict) -> tuple[list[float], list[float], list[int]]:
    """Non-empty bins of a calibration histogram (``mismatch.metrics``): mean confidence, accuracy, count."""
    conf, acc, count = [], [], []
    for b in calibration.get("bins", []):
        if b.get("count") and b.get("confidence") is not None and b.get("accuracy") is not None:
            conf.append(float(b["confidence"]))
            acc.append(float(b["accuracy"]))
            count.append(int(b["count"]))
    return conf, acc, count


def ece_of(evaluation: dict, key: str = "mean") -> float | None:
    value = (evaluation.get(key) or {}).get("calibration", {}).get("all", {}).get("ece")
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def reliability_diagram(evaluation: dict, slices: list[int] | None = None, chart=None):
    """Reliability diagram of a segment report's ``evaluation``: one series per decoder present and their
    mean, plus the diagonal; returns the chart node (title: the ECE of each)."""
    series, eces = [], []
    for key in ("mean", "positive_decoder", "negative_decoder"):
        calibration = (evaluation.get(key) or {}).get("calibration", {}).get("all")
        if not calibration:
            continue
        conf, acc, count = reliability_bins(calibration)
        table = _node("vtkMRMLTableNode", f"{RELIABILITY_CHART} table: {DECODER_LABELS[key]}")
        _fill_table(table, {"confidence": conf, "accuracy": acc, "voxels": count})
        series.append(_series(f"{RELIABILITY_CHART}: {DECODER_LABELS[key]}", table, "confidence", "accuracy",
                              SERIES_COLOURS[key], markers=True))
        ece = ece_of(evaluation, key)
        if ece is not None:
            eces.append(f"{'mean' if key == 'mean' else key.split('_')[0]} {ece:.3f}")
    ideal = _node("vtkMRMLTableNode", f"{RELIABILITY_CHART} table: ideal")
    _fill_table(ideal, {"confidence": [0.0, 1.0], "accuracy": [0.0, 1.0]})
    series.append(_series(f"{RELIABILITY_CHART}: perfect calibration", ideal, "confidence", "accuracy",
                          SERIES_COLOURS["ideal"], dashed=True))
    where = f" on held-out slices {', '.join(str(s) for s in slices)}" if slices else ""
    title = f"Reliability{where}: ECE " + (", ".join(eces) if eces else "n/a")
    chart = _chart(RELIABILITY_CHART, series, title, "confidence", "accuracy", chart)
    chart.SetXAxisRangeAuto(False)
    chart.SetYAxisRangeAuto(False)
    chart.SetXAxisRange(0.0, 1.0)
    chart.SetYAxisRange(0.0, 1.0)
    return chart
