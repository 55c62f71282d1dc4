"""Serving a trained model: `vitrine serve` (MLflow's scoring protocol over HTTP), `vitrine score`
(a Parquet/CSV file in batch) and `vitrine model list|show|promote` (the registry). The model itself,
raw IDs in and click probabilities out, is `trainer.scoring`; see docs/SERVING.md."""
