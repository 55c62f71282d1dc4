"""The training loop: one for every mode, which drives the mode's runner and makes its mode changes.

`fit` runs phases until the data is used up or a stop: each phase is one runner (`trainer/modes/`:
`sync` for single and all-reduce, `ps` for async and gba) that trains from the trainer's position
until the data ends, a stop, or a switch its phase agreed on, and returns an `Outcome` saying which.
A runner moves the training state as training does (parameters, optimizer, step, position in the
data, epoch-end evaluations); the loop alone changes the mode, records the switch (stdout, MLflow
tags) and hands the state to the next runner. What to switch to is decided by the job's one
`SwitchPolicy` (`trainer/switching.py`); when the job ends, the loop evaluates on test (coordinator),
writes the final checkpoint and the figures.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from trainer.config import PS_MODES
from trainer.coordinator import finite, log_switches
from trainer.modes import Outcome


def runner_for(phase: str) -> Callable[..., Outcome]:
    if phase in PS_MODES:
        from trainer.modes import ps

        return ps.run
    from trainer.modes import sync

    return sync.run


def fit(trainer, run_dir: Path, logger) -> dict[str, Any]:
    """Train until the data is used up or a stop; returns the final figures (coordinator) or the step."""
    cfg = trainer.cfg
    t_fit = time.perf_counter()
    steps_per_epoch = len(trainer.train_loader)
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=trainer.step, unit="step", dynamic_ncols=True, file=sys.stdout)
    while True:
        outcome = runner_for(trainer.phase)(trainer, run_dir, logger, total, bar)
        if outcome.kind != "switch":
            break
        # A mode change is the loop's to make: the runner ended its phase on a whole global batch.
        trainer.note_switch(trainer.phase, outcome.switch.to, outcome.switch.why)
        log_switches(trainer, logger)
        trainer.phase = outcome.switch.to
    if bar is not None:
        bar.close()
    train_seconds = time.perf_counter() - t_fit - trainer.eval_seconds
    if outcome.kind == "stopped":
        trainer.save_checkpoint(run_dir)
        print(f"stopped at step {trainer.step} on request; checkpoint in {run_dir} "
              f"(continue with `vitrine train --resume {run_dir}`)", flush=True)
        return {"steps": trainer.step, "stopped": True}
    final: dict[str, Any] = {"steps": trainer.step, "train_seconds": train_seconds}
    if not trainer.is_coordinator:
        return final
    if "test" in trainer.eval_loaders:
        m = trainer.evaluate("test")
        final.update({f"test_{k}": v for k, v in m.items()})
        if logger is not None:
            logger.log_metrics({f"test_{k}": v for k, v in m.items() if finite(v)}, step=trainer.step)
    if trainer.history:
        final.update({k: v for k, v in trainer.history[-1].items() if k.startswith("valid_")})
    if trainer.history:
        # Valid metrics per epoch, so a reader can tell a converged run from one still climbing or overfitting.
        final["epochs"] = [{k: v for k, v in h.items() if k in ("epoch", "step", "valid_auc", "valid_logloss")}
                           for h in trainer.history]
    if trainer.switches:
        final["switches"] = [list(x) for x in trainer.switches]
    final.update(getattr(trainer, "ps_stats", {}))
    trainer.save_checkpoint(run_dir)
    (run_dir / "metrics.json").write_text(json.dumps(final, indent=2, default=float))
    return final


