"""A registered classifier that answers after a pause: a canary that breaks its latency SLO.

Logged as an MLflow model from code (``python_model=<this file>``), so the model server loads it
without anything from the test suite on its path.
"""

import time

import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

PAUSE_S = 1.2


class SlowClassifier(PythonModel):
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        time.sleep(PAUSE_S)
        rows = len(model_input)
        return pd.DataFrame({"label": ["cancel_order"] * rows, "score": [1.0] * rows, "top_k": ["[]"] * rows})


set_model(SlowClassifier())
