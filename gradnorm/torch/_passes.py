"""Which pass of a step is running: for user code that must tell the clean pass from the extra ones.

A rule such as SAM runs the user's closure (a Lightning ``training_step``, a forward with logging)
more than once per step: first at the current weights, then at perturbed ones. Code that logs the
step's loss, updates metrics or counts samples should do so in the first pass only::

    def training_step(self, batch, batch_idx):
        loss = ...
        if not gradnorm.torch.is_extra_pass():
            self.log("train_loss", loss)
        return loss

`current_pass()` is 0 during the pass at the current weights, 1, 2, ... during the extra passes of
`gradnorm.torch.Optimizer.step`, and None outside a step's passes (so code run outside gradnorm, such
as validation, sees "not an extra pass").
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

__all__ = ["current_pass", "is_extra_pass", "running_pass"]

_local = threading.local()


def current_pass() -> int | None:
    """The index of the pass of a gradnorm step running now (0: at the current weights), or None."""
    return getattr(_local, "index", None)


def is_extra_pass() -> bool:
    """Whether an extra pass of a gradnorm step (at perturbed weights) is running now."""
    index = getattr(_local, "index", None)
    return index is not None and index > 0


@contextlib.contextmanager
def running_pass(index: int) -> Iterator[None]:
    """Mark pass `index` of a step as running (nested steps restore the outer value)."""
    outer = getattr(_local, "index", None)
    _local.index = index
    try:
        yield
    finally:
        _local.index = outer
