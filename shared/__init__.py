"""What the orchestrator and the workers both need: settings, the Celery app, Redis keys,
the HDF5 schema, image loading, model builders and errors."""

__version__ = "0.1.0"
