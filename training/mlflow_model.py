"""The file MLflow runs to build a logged Loomwatch model ("models from code").

It is copied into every logged model; all it does is name the class from the installed package,
so loading a model never unpickles code. See :mod:`training.pyfunc`.
"""

import mlflow

from training.pyfunc import BundleModel

mlflow.models.set_model(BundleModel())
