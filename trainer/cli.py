"""`vitrine train`."""

from __future__ import annotations

import argparse
import os

from vitrine.config import add_dataclass_args, from_args


def register(sub: argparse._SubParsersAction) -> None:
    from trainer.config import TrainConfig

    p = sub.add_parser("train", help="train the Deep Image CTR Model on a processed dataset")
    add_dataclass_args(p, TrainConfig)
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from trainer.config import TrainConfig

    cfg = from_args(TrainConfig, args)
    if not cfg.resume:
        cfg.check()  # a bad setting exits 2 naming its flag, before torch is even imported
        _check_features(cfg)
    from trainer.train import train

    result = train(cfg)
    # A worker of our launcher: the launcher reports. Under torchrun, rank 0 reports for the job.
    if not os.environ.get("VITRINE_LAUNCHED") and os.environ.get("RANK", "0") == "0":
        print(summarize(result))
    return 0


def _check_features(cfg) -> None:
    """Image features on a dataset without images: refused at once, naming the flag."""
    if cfg.features == "ids":
        return
    import json
    from pathlib import Path

    from vitrine.errors import UserError

    try:
        manifest = json.loads((Path(cfg.dataset) / "manifest.json").read_text())
    except (OSError, ValueError):
        return  # the dataset's own checks explain what is wrong with it
    if isinstance(manifest, dict) and not manifest.get("images"):
        raise UserError(f"--features {cfg.features} needs item images, but the dataset {cfg.dataset} has none (its "
                        "catalogue had no images); train it with --features ids")


def summarize(r: dict) -> str:
    def f(key: str) -> str:
        v = r.get(key)
        return "-" if v is None else f"{v:.4f}"

    lines = [
        f"test      AUC {f('test_auc')}  GAUC {f('test_gauc')}  logloss {f('test_logloss')}  "
        f"cold-start AUC {f('test_cold_auc')} ({r.get('test_cold_n', 0)} impressions)",
        f"oracle    AUC {f('test_oracle_auc')} (the best any model can do on this test split)",
        f"steps     {r.get('steps')}; checkpoints in {r.get('run_dir')}",
    ]
    ams = r.get("ams")
    if ams:
        lines.append(
            f"images    AMS moved {ams['ams_bytes_per_sample']:,.0f} B/sample ({ams['ams_bytes_per_unique_image']:.0f} B "
            f"per unique image, {ams['ams_dedup_ratio']:.2f} image occurrences per unique image); a plain PS would "
            f"move {ams['plain_trunk_bytes_per_sample']:,.0f} B/sample of trunk features "
            f"({ams['plain_trunk_bytes_per_sample'] / max(ams['ams_bytes_per_sample'], 1e-9):,.0f}x) or "
            f"{ams['plain_pixels_bytes_per_sample']:,.0f} B/sample of pixels "
            f"({ams['plain_pixels_bytes_per_sample'] / max(ams['ams_bytes_per_sample'], 1e-9):,.0f}x)")
    if r.get("stopped"):
        lines.append(f"stopped   on request at step {r.get('steps')}; continue with --resume {r.get('run_dir')}")
    if r.get("run_id"):
        lines.append(f"mlflow    run {r['run_id']} in experiment vitrine-train")
    return "\n".join(lines)
