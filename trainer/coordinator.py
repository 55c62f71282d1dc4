"""What the coordinator (rank 0, or the one process) adds to training: validation at epoch ends and the
record of mode switches in its MLflow run. The loop and the PS phase both call these, so an epoch end
is logged the same way whichever runner trained it."""

from __future__ import annotations

import math
from typing import Any


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def end_of_epoch(trainer: Trainer, logger, head_at: int | None = None) -> None:
    """Evaluate on valid (coordinator) after an epoch. `head_at`: see `Trainer.predict`."""
    if "valid" in trainer.eval_loaders and trainer.is_coordinator:
        m = trainer.evaluate("valid", head_at)
        trainer.history.append({"epoch": trainer.epoch, "step": trainer.step, **{f"valid_{k}": v for k, v in m.items()}})
        if logger is not None:
            logger.log_metrics({f"valid_{k}": v for k, v in m.items() if finite(v)}, step=trainer.step)


def log_switches(trainer: Trainer, logger) -> None:
    """One tag per switch, `vitrine.switch.<step>` = "<from>-><to>" (what the dashboard draws), and why."""
    if logger is None:
        return
    for step, old, new, why in trainer.switches:
        logger.set_tag(f"vitrine.switch.{step}", f"{old}->{new}")
        logger.set_tag(f"vitrine.switch_reason.{step}", why)


