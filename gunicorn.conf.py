"""gunicorn's settings for `gunicorn wsgi:app`: gunicorn reads this file from the folder it starts in.

Command-line options override it (`--workers 4`); `python app.py` sets the same options itself.
"""

import os

from app import SERVER_ID_ENV_VAR, worker_exited

# The master imports the app and loads the served model once, then forks the workers: a worker
# gunicorn starts (at boot, or in place of one that crashed or timed out) answers at once instead
# of importing for most of a second, and the workers share the master's memory until they write.
preload_app = True

# The request counts of one server live in one metrics folder, which a new server empties; the
# master's process id, which its workers inherit, says which server a folder belongs to (wsgi.py).
os.environ[SERVER_ID_ENV_VAR] = str(os.getpid())

# A worker that ends leaves no live gauges behind, as prometheus_client asks of gunicorn.
child_exit = worker_exited
