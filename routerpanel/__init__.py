"""RouterPanel: a Django control panel and OpenAI-compatible gateway for LLM engine fleets."""

from .celery import app as celery_app

__all__ = ["celery_app"]
