"""The DeepCTR-Torch side of benchmarks/peer_bench.py: DIN trained on a Vitrine processed dataset.

Runs in the benchmark's own environment (benchmarks/.peer-venv, made by peer_bench.py), never in
Vitrine's: it imports deepctr_torch, torch, numpy and pyarrow only, nothing from this repository.
It reads the dataset's manifest.json and Parquet shards directly (docs/DATA.md): every categorical
field becomes a SparseFeat, every behaviour sequence that mirrors an ad field (`hist_<name>`, same
vocabulary) a VarLenSparseFeat sharing that field's embedding, padded with 0 to the manifest's
max_len (the last max_len entries, oldest first, as Vitrine's loader does) with `hist_len` as its
length. Trains on `train` for --epochs (no validation pass), predicts every `test` row, and writes
the predictions with their impression ids to --out (.npz) plus the timing to --out's .json; the
caller computes the metrics, with Vitrine's definitions, on the same rows.

    benchmarks/.peer-venv/bin/python benchmarks/peer_din.py --dataset DS --epochs 4 --seed 0 --out P.npz
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def pad_last(arr: pa.ChunkedArray, max_len: int) -> np.ndarray:
    """list<int> -> (n, max_len) int64: the last max_len entries of each list, right-padded with 0."""
    rows = arr.to_pylist()
    out = np.zeros((len(rows), max_len), dtype=np.int64)
    for i, r in enumerate(rows):
        r = r[-max_len:]
        out[i, :len(r)] = r
    return out


def load(ds: Path, manifest: dict, split: str, sparse: list[str], seqs: list[str], max_len: int):
    label = manifest.get("label", "label")
    tables = [pq.read_table(ds / s["file"], columns=["impression_id", label, "hist_len", *sparse, *seqs])
              for s in manifest["splits"][split]["shards"]]
    t = pa.concat_tables(tables)
    x = {c: t.column(c).to_numpy().astype(np.int64) for c in sparse}
    for c in seqs:
        x[c] = pad_last(t.column(c), max_len)
    x["hist_len"] = np.minimum(t.column("hist_len").to_numpy().astype(np.int64), max_len)
    return x, t.column(label).to_numpy().astype(np.float32), t.column("impression_id").to_numpy()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--embed-dim", type=int, default=12, help="embedding size of every field (Vitrine's default: 12)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch
    import deepctr_torch
    from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat, get_feature_names
    from deepctr_torch.models import DIN

    if args.threads:
        torch.set_num_threads(args.threads)
    ds = Path(args.dataset)
    manifest = json.loads((ds / "manifest.json").read_text())
    fields = manifest["fields"]
    cats = [f for f in fields if f["kind"] == "categorical"]
    by_name = {f["name"]: f for f in cats}
    # Behaviour sequences whose ad counterpart exists (hist_item_id -> item_id, same vocabulary).
    hist = [f for f in fields if f["kind"] == "sequence" and f["name"].startswith("hist_")
            and f["name"][5:] in by_name and by_name[f["name"][5:]]["vocab"] == f["vocab"]]
    max_len = max([int(f["max_len"]) for f in hist] or [1])
    d = args.embed_dim
    columns = [SparseFeat(f["name"], vocabulary_size=int(f["vocab_size"]), embedding_dim=d) for f in cats]
    columns += [VarLenSparseFeat(SparseFeat(f["name"], vocabulary_size=int(f["vocab_size"]), embedding_dim=d,
                                            embedding_name=f["name"][5:]), maxlen=max_len, length_name="hist_len")
                for f in hist]
    history = [f["name"][5:] for f in hist]
    sparse, seqs = [f["name"] for f in cats], [f["name"] for f in hist]

    t0 = time.perf_counter()
    xtr, ytr, _ = load(ds, manifest, "train", sparse, seqs, max_len)
    xte, yte, ids = load(ds, manifest, "test", sparse, seqs, max_len)
    load_s = time.perf_counter() - t0
    names = get_feature_names(columns)
    xtr = {n: xtr[n] for n in names}
    xte = {n: xte[n] for n in names}

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    model = DIN(columns, history, device="cpu", seed=args.seed)  # the library's defaults otherwise
    model.compile("adam", "binary_crossentropy", metrics=[])
    t0 = time.perf_counter()
    model.fit(xtr, ytr, batch_size=args.batch_size, epochs=args.epochs, verbose=0)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    p = model.predict(xte, batch_size=4096).reshape(-1).astype(np.float64)
    predict_s = time.perf_counter() - t0

    out = Path(args.out)
    np.savez(out, impression_id=ids, p=p, y=yte)
    out.with_suffix(".json").write_text(json.dumps({
        "train_rows": int(len(ytr)), "test_rows": int(len(yte)), "epochs": args.epochs, "seed": args.seed,
        "batch_size": args.batch_size, "embed_dim": d, "history": history, "max_len": max_len,
        "train_seconds": train_s, "samples_per_s": len(ytr) * args.epochs / train_s,
        "load_seconds": load_s, "predict_seconds": predict_s, "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "deepctr_torch": deepctr_torch.__version__,
        "pid": os.getpid()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
