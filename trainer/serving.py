"""The model as MLflow serves it: one self-contained module, one float32 matrix in, CTRs out.

MLflow's PyTorch flavour feeds a model one tensor, so an impression is packed into one float32 row
(IDs are exact in float32 below 2**24). The module carries the DICM, the trained descriptor head and
the standardised trunk features of every image in the store, so scoring needs no image service:
`mlflow.pytorch.load_model(uri)(torch.from_numpy(pack(batch, layout)))`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

EXACT = 2**24


def layout_for(model, max_len: int) -> list[tuple[str, int]]:
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
    parts = []
    for name, width in layout:
        t = batch[name]
        if t.numel() and int(t.max()) >= EXACT:
            raise ValueError(f"{name}: ids >= 2**24 cannot travel exactly as float32")
        parts.append(t.reshape(t.shape[0], width).to(torch.float32))
    return torch.cat(parts, dim=1).numpy()


class CTRPredictor(nn.Module):
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

    def forward(self, x: Tensor) -> Tensor:
        batch, col = {}, 0
        for name, width in self.layout:
            v = x[:, col:col + width].round().to(torch.int64)
            batch[name] = v.squeeze(1) if width == 1 else v
            col += width
        ad = hist = None
        if self.head is not None:
            # The features travel as float32; a float64 head (exactness runs) reads them in its dtype.
            feats = self.trunk_features.to(next(self.head.parameters()).dtype)
            if self.model.uses_ad_image:
                ad = self.head(feats[batch["ad_image"]])
            if self.model.uses_hist_images:
                L = batch["hist_image"].shape[1]
                mask = torch.arange(L).unsqueeze(0) < batch["hist_len"].unsqueeze(1)
                ids = batch["hist_image"]
                flat = self.head(feats[ids.reshape(-1)])  # PReLU wants (N, C)
                hist = flat.reshape(ids.shape[0], L, -1) * mask.unsqueeze(-1)
        return torch.sigmoid(self.model(batch, ad, hist))
