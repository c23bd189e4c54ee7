"""The production entry point: `gunicorn wsgi:app` serves the API of config.json or $RISK_CONFIG.

gunicorn.conf.py has the master import this module once (preload_app) and fork the workers from it,
with the served model already loaded. The metrics folder is set before the app (and
prometheus_client) is; a new server empties it. Without gunicorn.conf.py (`gunicorn -c other.py`,
no preload) each worker imports this module itself, and its parent, the master, names the server.
"""

import os

from app import SERVER_ID_ENV_VAR, create_app, preload, use_metrics_folder
from errors import configure_logging
from settings import load_settings

configure_logging()
settings = load_settings()
use_metrics_folder(settings, server_id=os.environ.get(SERVER_ID_ENV_VAR) or str(os.getppid()))
app = create_app(settings)
preload(app)
