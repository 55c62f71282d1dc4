"""The runner of the synchronous modes: one process (`single`) or N workers that all-reduce every step
(`ar`, `trainer/distributed/allreduce.py`). The step itself is `Trainer.train_step`: in AR it carries
the stop flag, a switch and the straggler setting on the all-reduce, so every worker leaves this loop
after the same step."""

from __future__ import annotations

import time
from pathlib import Path

from trainer.coordinator import end_of_epoch, step_figures
from trainer.data import prefetched
from trainer.modes import Outcome
from vitrine import jobs


def run(trainer, run_dir: Path, logger, total: int, bar) -> Outcome:
    """Single-process or all-reduce steps until the data ends ("done"), a stop ("stopped") or a switch
    to a PS mode that every worker agreed on ("switch")."""
    cfg = trainer.cfg
    steps_per_epoch = len(trainer.train_loader)
    window_t, window_n = time.perf_counter(), 0
    done = trainer.step >= total
    while not done and trainer.epoch < cfg.epochs:
        batches = iter(prefetched(trainer.train_loader.epoch(trainer.epoch, skip_batches=trainer.batch_in_epoch),
                                  cfg.interleave))
        while True:
            t_data = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            loss = trainer.train_step(batch, data_s=time.perf_counter() - t_data)
            window_n += int(batch["label"].shape[0])
            if trainer.step % cfg.log_every == 0 or trainer.step == total or trainer.switch_to:
                now = time.perf_counter()
                sps = window_n / max(now - window_t, 1e-9)
                window_t, window_n = now, 0
                if logger is not None:
                    m = step_figures(trainer, trainer.step, loss, sps, trainer.sched.get_last_lr()[0],
                                     dict(enumerate(trainer.worker_step_s)))
                    logger.log_metrics(m, step=trainer.step)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{sps:,.0f}")
            if bar is not None:
                bar.update(1)
            jobs.report_progress(trainer.step, total, loss=loss, epoch=trainer.epoch)
            if trainer.step % cfg.checkpoint_every == 0:
                trainer.save_checkpoint(run_dir)
            if trainer.step >= total:
                done = True
                break
            if trainer.stop_requested:
                return Outcome("stopped")
            new = trainer.take_switch()
            if new is not None:
                if trainer.batch_in_epoch >= steps_per_epoch:
                    trainer.next_epoch()
                    end_of_epoch(trainer, logger)
                return Outcome("switch", new)
        if trainer.stop_requested and not done:
            return Outcome("stopped")
        if not done or trainer.batch_in_epoch >= steps_per_epoch:
            # A finished epoch: evaluate on valid, move on.
            trainer.next_epoch()
            end_of_epoch(trainer, logger)
            trainer.save_checkpoint(run_dir)
    return Outcome("done")


