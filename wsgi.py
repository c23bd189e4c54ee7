"""The production entry point: `gunicorn wsgi:app` serves the API of config.json or $RISK_CONFIG."""

from app import create_app
from errors import configure_logging

configure_logging()
app = create_app()
