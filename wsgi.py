"""The production entry point: `gunicorn wsgi:app` serves the API of config.json or $RISK_CONFIG.

Each worker imports this module; the metrics folder is set before the app (and prometheus_client)
is, and the first worker of a new server (a new gunicorn master, the workers' parent) empties it.
"""

import os

from app import create_app, use_metrics_folder
from errors import configure_logging
from settings import load_settings

configure_logging()
settings = load_settings()
use_metrics_folder(settings, server_id=str(os.getppid()))
app = create_app(settings)
