"""Celery tasks, one module per queue: extract (and merge), train, cam."""
