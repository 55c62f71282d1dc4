"""The trained model as one self-contained scorer, and how a training run logs and registers it.

`CTRPredictor` carries the DICM, the trained descriptor head and the standardised trunk features of
every image in the store, so scoring needs no image service. It scores a batch of encoded rows (the
loader's batch format, `trainer/data.py`) with `score`, or one float32 matrix of packed rows with
`forward` (`pack`; IDs are exact in float32 below 2**24).

What a training run logs as `runs:/RUN_ID/model` is an MLflow pyfunc model (`trainer.scoring`): the
pickled predictor plus the dataset's lookup tables, so that it scores *raw* IDs as the user's logs
name them (docs/SERVING.md). `log_model` logs it and registers it in the model registry;
`load_predictor` gives back the torch predictor of any run's model (also of runs logged before the
pyfunc model, whose `model` was MLflow's PyTorch flavour).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

EXACT = 2**24
PREDICTOR_FILE = "predictor.pt"
MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def layout_for(model, max_len: int) -> list[tuple[str, int]]:
    """The columns of a packed row, in order, as (name, width): every categorical field, every
    behaviour sequence (width `max_len`), `hist_len`, then the image columns the model reads."""
    fmap = model.fmap
    cols = [(f.name, 1) for f in fmap.categorical]
    cols += [(f.name, max_len) for f in fmap.sequences]
    cols.append(("hist_len", 1))
    if model.uses_ad_image:
        cols.append(("ad_image", 1))
    if model.uses_hist_images:
        cols.append(("hist_image", max_len))
    return cols


def pack(batch: dict[str, Tensor], layout: list[tuple[str, int]]) -> np.ndarray:
    """A loader batch (int64 tensors, sequences padded to the layout's width) -> one float32 matrix of
    shape (B, sum of widths), the columns in `layout` order. Raises ValueError for an ID of 2**24 or
    more, which float32 cannot hold exactly."""
    parts = []
    for name, width in layout:
        t = batch[name]
        if t.numel() and int(t.max()) >= EXACT:
            raise ValueError(f"{name}: ids >= 2**24 cannot travel exactly as float32")
        parts.append(t.reshape(t.shape[0], width).to(torch.float32))
    return torch.cat(parts, dim=1).numpy()


class CTRPredictor(nn.Module):
    """DICM + descriptor head + trunk features: click probabilities from encoded rows.

    `layout` is the packed row's layout (`layout_for`). `freeze_images()` computes every image's
    embedding once with the head (as the image service does, in blocks of the same shape), after which
    scoring looks embeddings up instead of running the head per request.
    """

    def __init__(self, model: nn.Module, head: nn.Module | None, trunk_features: Tensor | None,
                 layout: list[tuple[str, int]]):
        super().__init__()
        self.model = model
        self.head = head
        if trunk_features is not None:
            self.register_buffer("trunk_features", trunk_features.to(torch.float32))
        else:
            self.trunk_features = None
        self.layout = layout
        self.image_table: Tensor | None = None

    @torch.no_grad()
    def freeze_images(self) -> "CTRPredictor":
        """Embed every image of the store once (in `image_service.service.EMBED_BLOCK`-row blocks, so
        each embedding has the bits the image service gave the trainer's evaluation)."""
        if self.head is None or self.trunk_features is None:
            return self
        from image_service.service import EMBED_BLOCK

        self.head.eval()
        feats = self.trunk_features.to(next(self.head.parameters()).dtype)
        n = feats.shape[0]
        pad = -n % EMBED_BLOCK
        if pad:
            feats = torch.cat([feats, feats.new_zeros((pad, feats.shape[1]))])
        self.image_table = torch.cat([self.head(b) for b in feats.split(EMBED_BLOCK)])[:n].contiguous()
        return self

    def _embed(self, ids: Tensor) -> Tensor:
        if self.image_table is not None:
            return self.image_table[ids]
        # The features travel as float32; a float64 head (exactness runs) reads them in its dtype.
        feats = self.trunk_features.to(next(self.head.parameters()).dtype)
        return self.head(feats[ids])  # PReLU wants (N, C)

    def score(self, batch: dict[str, Tensor]) -> Tensor:
        """Click probabilities (B,) of a batch of encoded rows: int64 tensors by field name, sequences
        (B, L) right-padded, `hist_len` (B,), `ad_image` (B,) and `hist_image` (B, L) image-store rows."""
        ad = hist = None
        if self.head is not None:
            if self.model.uses_ad_image:
                ad = self._embed(batch["ad_image"])
            if self.model.uses_hist_images:
                ids = batch["hist_image"]
                L = ids.shape[1]
                mask = torch.arange(L).unsqueeze(0) < batch["hist_len"].unsqueeze(1)
                flat = self._embed(ids.reshape(-1))
                hist = flat.reshape(ids.shape[0], L, -1) * mask.unsqueeze(-1)
        return torch.sigmoid(self.model(batch, ad, hist))

    def unpack(self, x: Tensor) -> dict[str, Tensor]:
        """The inverse of `pack`: a float32 (B, width) matrix -> int64 tensors by column name."""
        batch, col = {}, 0
        for name, width in self.layout:
            v = x[:, col:col + width].round().to(torch.int64)
            batch[name] = v.squeeze(1) if width == 1 else v
            col += width
        return batch

    def forward(self, x: Tensor) -> Tensor:
        """Click probabilities (B,) of packed rows (`pack`)."""
        return self.score(self.unpack(x))


def build_predictor(trainer) -> CTRPredictor:
    """The trainer's model, the service's head and every image's trunk features, in eval mode."""
    split = "test" if "test" in trainer.eval_loaders else "valid"
    batch = next(iter(trainer.eval_loaders[split].epoch(0)))
    seq = [k for k in ("hist_image", *(f.name for f in trainer.fmap.sequences)) if k in batch]
    layout = layout_for(trainer.model, batch[seq[0]].shape[1] if seq else 0)
    service = trainer.service
    head = service.head_module() if service is not None else None
    feats = service.trunk_features(torch.arange(service.n_images)) if service is not None else None
    return CTRPredictor(trainer.model, head, feats, layout).eval()


def default_model_name(dataset_name: str) -> str:
    """`vitrine-<dataset name>`, with characters the registry does not take replaced by '-'."""
    return "vitrine-" + (re.sub(r"[^A-Za-z0-9_.-]+", "-", dataset_name).strip("-") or "dataset")


def log_model(trainer, logger, model_name: str | None = None) -> Any:
    """Log the run's scoring model as `runs:/RUN_ID/model` (a pyfunc model that takes raw IDs) and
    register it as a new version of `model_name` (default: `vitrine-<dataset name>`). Also logs
    `model_layout.json` (the packed row's layout). Returns MLflow's ModelInfo."""
    import copy

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    from trainer.scoring import input_example, model_signature, write_encoder

    predictor = build_predictor(trainer)
    name = model_name or default_model_name(str(trainer.ds.manifest.get("name") or trainer.ds.dir.name))
    with tempfile.TemporaryDirectory() as tmp:
        # A copy on the CPU, so the pickle holds the weights as they are now and nothing of the trainer.
        torch.save(copy.deepcopy(predictor).cpu(), Path(tmp) / PREDICTOR_FILE)
        encoder = write_encoder(trainer.ds, predictor, Path(tmp) / "encoder")
        with mlflow.start_run(run_id=logger.run_id):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(Path(__file__).with_name("pyfunc_model.py")),
                artifacts={"predictor": str(Path(tmp) / PREDICTOR_FILE), "encoder": str(Path(tmp) / "encoder")},
                signature=model_signature(encoder), input_example=input_example(Path(tmp) / "encoder"),
                registered_model_name=name,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
                                  "pandas", "pyarrow"])
    logger.log_dict({"layout": predictor.layout}, "model_layout.json")
    return info


def load_predictor(uri: str) -> CTRPredictor:
    """The torch predictor (eval mode, packed rows in) of a logged model at an MLflow model URI."""
    import mlflow
    from mlflow.models import Model

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    local = Path(mlflow.artifacts.download_artifacts(uri))
    if "pytorch" in Model.load(local).flavors:  # a run logged before the pyfunc model (an exported program)
        import mlflow.pytorch

        return mlflow.pytorch.load_model(str(local))
    return torch.load(local / "artifacts" / PREDICTOR_FILE, weights_only=False, map_location="cpu").eval()
