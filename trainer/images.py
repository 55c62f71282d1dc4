"""The worker's side of the AMS protocol for one batch.

The model never sees pixels or trunk features: the batch's image ids go to the image service, which
returns one small embedding per *unique* image; the worker expands them to the batch's positions as a
leaf tensor, so after `loss.backward()` the leaf's gradient is exactly d(loss)/d(embedding) per
unique image, which is what goes back to the service. This is the only place that talks to the
service during training, so moving the service into another process changes nothing here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ImageInputs:
    ad: Tensor | None          # (B, d) or None
    hist: Tensor | None        # (B, L, d) or None
    leaf: Tensor | None        # (U, d) embeddings of the unique ids, requires grad
    unique_ids: Tensor | None  # (U,)
    version: int = -1

    def push_gradients(self, service, token: int | None, wait: bool = True) -> None:
        if self.leaf is not None and self.leaf.grad is not None:
            service.backward(self.unique_ids, self.leaf.grad, token=token, wait=wait)


def image_inputs(batch: dict[str, Tensor], service, use_ad: bool, use_hist: bool, train: bool,
                 head_at: int | None = None) -> ImageInputs:
    """`service`: an `image_service.client` client, local or remote (the same calls either way).
    `head_at` (evaluation): embed with the head as it was after that global step."""
    if not (use_ad or use_hist):
        return ImageInputs(None, None, None, None)
    B = batch["label"].shape[0]
    parts = []
    if use_ad:
        parts.append(batch["ad_image"])
    if use_hist:
        hist = batch["hist_image"]
        L = hist.shape[1]
        mask = torch.arange(L).unsqueeze(0) < batch["hist_len"].unsqueeze(1)
        parts.append(hist[mask])
    res = service.embed(torch.cat(parts), train=train, at_step=head_at)
    leaf = res.embeddings.detach().requires_grad_(train)
    full = leaf[res.inverse]
    ad = hist_emb = None
    offset = 0
    if use_ad:
        ad = full[:B]
        offset = B
    if use_hist:
        hist_emb = full.new_zeros((B, L, full.shape[1]))
        hist_emb = hist_emb.masked_scatter(mask.unsqueeze(-1), full[offset:])
    return ImageInputs(ad, hist_emb, leaf, res.unique_ids, res.version)
