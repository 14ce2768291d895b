"""The one owner of the MLflow store: where it is, model URIs, the registry, their errors.

* :mod:`tracking.store` — the tracking store (``MLFLOW_TRACKING_URI`` or ``./mlflow.db``),
  the experiment, and MLflow failures as one-line :class:`~tracking.store.TrackingError` s;
* :mod:`tracking.uris` — the model-URI grammar and its resolution to a local bundle folder
  (downloading into a cache);
* :mod:`tracking.registry` — registered versions, their tags and aliases.

Both ``training`` and ``app`` use it; it uses only ``models`` (and MLflow), never them. Importing
:mod:`tracking.store` or :mod:`tracking.uris` does not import MLflow: a local bundle folder is
served without it.
"""
