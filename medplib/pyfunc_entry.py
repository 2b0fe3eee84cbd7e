"""The served model's entry for MLflow "models from code": MLflow logs this file's source, not a pickle of
`MedPLIBPyfunc`, and runs it when the model is loaded (serving, `mlflow.pyfunc.load_model`). Weights travel as the
`weights` artifact in safetensors. Not imported by medplib itself."""
import mlflow

from medplib.serve import MedPLIBPyfunc

mlflow.models.set_model(MedPLIBPyfunc())
