"""The model-from-code file MLflow stores with every logged Vitrine model (`mlflow.pyfunc.log_model`
with `python_model=` this file's path): loading the model runs it, and it names the class that
scores (`trainer.scoring.ScoringModel`), so nothing is unpickled but the torch predictor."""

from mlflow.models import set_model

from trainer.scoring import ScoringModel

set_model(ScoringModel())
