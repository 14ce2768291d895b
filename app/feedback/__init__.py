"""What operators said about predictions, in a database (SQLAlchemy 2, migrations by Alembic).

- :mod:`app.feedback.tables`: the tables (``predictions``, ``feedback``).
- :mod:`app.feedback.store`: :class:`FeedbackStore`, the one way in: record predictions, list
  them, add feedback, keep images within their retention bound, read the evidence for
  ``loomwatch calibrate --feedback``.
- :mod:`app.feedback.routes`: the HTTP routes (``/predictions``, ``/predictions/{id}/feedback``).
- ``migrations/``: the Alembic environment and revisions; the service upgrades the database to
  the newest revision when it starts (``alembic -c app/feedback/alembic.ini ...`` for the rest).
"""
