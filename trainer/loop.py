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


TRAIN_SECONDS_COVERS = (
    "wall seconds of this process's training loop: data, steps, image-service and PS traffic, checkpoints; "
    "not start-up, the test evaluation or model logging, nor valid evaluations that paused training (in a PS "
    "phase the others train on while the coordinator evaluates, so those count); a resumed run counts only "
    "its own steps")


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
    step0 = trainer.step  # this process's steps (a resumed run starts later)
    steps_per_epoch = len(trainer.train_loader)
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=trainer.step, unit="step", dynamic_ncols=True, file=sys.stdout)
    ps_figures: dict[str, float] = {}  # the job's PS phases, added up
    while True:
        outcome = runner_for(trainer.phase)(trainer, run_dir, logger, total, bar)
        if outcome.figures:
            from trainer.modes.ps import fold_phases

            ps_figures = fold_phases(ps_figures, outcome.figures)
            if logger is not None:
                logger.log_metrics(ps_figures, step=trainer.step)
        if outcome.kind != "switch":
            break
        # A mode change is the loop's to make: the runner ended its phase on a whole global batch.
        trainer.switch_phase(outcome.switch.to, outcome.switch.why)
        log_switches(trainer, logger)
    if bar is not None:
        bar.close()
    train_seconds = time.perf_counter() - t_fit - trainer.eval_seconds
    if outcome.kind == "stopped":
        trainer.save_checkpoint(run_dir)
        print(f"stopped at step {trainer.step} on request; checkpoint in {run_dir} "
              f"(continue with `vitrine train --resume {run_dir}`)", flush=True)
        return {"steps": trainer.step, "stopped": True}
    final: dict[str, Any] = {"steps": trainer.step, "train_seconds": train_seconds}
    samples = (trainer.step - step0) * cfg.step_batch()  # an upper bound when an epoch's last batch is short
    final.update(train_samples=samples, samples_per_s=samples / max(train_seconds, 1e-9),
                 train_seconds_covers=TRAIN_SECONDS_COVERS)
    if logger is not None:
        logger.log_metrics({"train_seconds": train_seconds, "train_samples_per_s": final["samples_per_s"]},
                           step=trainer.step)
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
    final.update(ps_figures)
    if trainer.exchange_steps:  # all-reduce phases: what this worker put into each step's exchanges
        final["ar_exchange_bytes_per_step"] = trainer.exchange_bytes / trainer.exchange_steps
    trainer.save_checkpoint(run_dir)
    (run_dir / "metrics.json").write_text(json.dumps(final, indent=2, default=float))
    return final


