"""Training methods: how a labelled and an unlabelled batch become a loss.

Every method shares the one training loop in :mod:`mismatch.train`. A method names the architecture it
trains, says whether it needs unlabelled slices, and implements :meth:`Method.loss`.
"""

from __future__ import annotations

from .base import Method, TrainingBatch
from .mismatch import MisMatchMethod
from .supervised import SupervisedMethod

METHODS: dict[str, type[Method]] = {}


def register(name: str, factory) -> None:
    METHODS[name] = factory


register("mismatch", lambda **kw: MisMatchMethod(architecture="mismatch", **kw))
register("unet", lambda **kw: SupervisedMethod(architecture="unet", augment=True, **kw))
# the paper's "Sup2": the MisMatch network trained on the labelled slices only
register("sup2", lambda **kw: SupervisedMethod(architecture="mismatch", augment=True, **kw))
# decoder ablations (paper Sec. 3.3), trained like MisMatch
for _arch in ("mm-a", "mm-b", "mm-c"):
    register(_arch, (lambda a: (lambda **kw: MisMatchMethod(architecture=a, **kw)))(_arch))


def make_method(name: str, **options) -> Method:
    """A method by name with its options (unknown options for that method are ignored)."""
    if name not in METHODS:
        raise KeyError(name)
    return METHODS[name](**options)


__all__ = ["METHODS", "Method", "MisMatchMethod", "SupervisedMethod", "TrainingBatch", "make_method", "register"]
