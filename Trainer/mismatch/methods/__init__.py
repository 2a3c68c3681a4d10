"""Training methods: how a labelled and an unlabelled batch become a loss.

Every method shares the one training loop in :mod:`mismatch.train`. A method names the architecture it
trains, says whether it needs unlabelled slices, and implements :meth:`Method.loss`.
"""

from __future__ import annotations

from .base import Method, TrainingBatch
from .cct import CCTMethod
from .fixmatch import FixMatchMethod
from .mean_teacher import MeanTeacherMethod
from .mismatch import MisMatchMethod
from .morph import MorphMethod
from .mta import MTAMethod
from .supervised import SupervisedMethod

METHODS: dict[str, type[Method]] = {}


def register(name: str, factory) -> None:
    METHODS[name] = factory


register("mismatch", lambda **kw: MisMatchMethod(architecture="mismatch", **kw))
register("unet", lambda **kw: SupervisedMethod(architecture="unet", augment="paper", **kw))
# a strong supervised U-Net: what a careful engineer trains on the labelled slices alone (Dice +
# cross-entropy, augmentation that does not invent anatomy); the bar MisMatch's default has to clear
register("unet-strong", lambda **kw: SupervisedMethod(
    architecture="unet", name="unet-strong", **{"augment": "anatomy", "cross_entropy": True, **kw}))
# the paper's "Sup2": the MisMatch network trained on the labelled slices only
register("sup2", lambda **kw: SupervisedMethod(architecture="mismatch", augment="paper", **kw))
# decoder ablations (paper Sec. 3.3), trained like MisMatch
for _arch in ("mm-a", "mm-b", "mm-c"):
    register(_arch, (lambda a: (lambda **kw: MisMatchMethod(architecture=a, **kw)))(_arch))
# the paper's semi-supervised baselines (Sec. 3.1) on the same backbone; see docs/methods.md
register("mt", lambda **kw: MeanTeacherMethod(**kw))
register("fixmatch", lambda **kw: FixMatchMethod(**kw))
register("cct", lambda **kw: CCTMethod(**kw))
register("mta", lambda **kw: MTAMethod(**kw))
register("morph", lambda **kw: MorphMethod(**kw))


def make_method(name: str, **options) -> Method:
    """A method by name with its options (unknown options for that method are ignored)."""
    if name not in METHODS:
        raise KeyError(name)
    return METHODS[name](**options)


__all__ = ["METHODS", "CCTMethod", "FixMatchMethod", "MTAMethod", "MeanTeacherMethod", "Method", "MisMatchMethod",
           "MorphMethod", "SupervisedMethod", "TrainingBatch", "make_method", "register"]
