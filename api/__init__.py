"""The s3search REST service (FastAPI): it writes jobs and reads results; no sampling math lives here."""

from .app import create_app
from .settings import Settings

__all__ = ["create_app", "Settings"]
