"""The WSGI entry gunicorn loads in each worker after fork (so no model or CUDA state lives in the master)."""

from serve.app import create_app
from serve.config import load_settings
from serve.log import configure_logging

settings = load_settings()
configure_logging(settings.log_level)
app = create_app(settings, exit_on_load_failure=True)
