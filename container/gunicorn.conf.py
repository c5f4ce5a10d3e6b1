"""gunicorn settings for SageMaker: port 8080, gthread workers, model loaded per worker after fork."""

import logging
import os
import shutil
import signal
import sys
import tempfile

from serve.config import SettingsError, load_settings
from serve.http.shutdown import stopping_engine
from serve.sagemaker.custom_handler import HandlerError, code_dir, install_requirements

try:
    _settings = load_settings()
except SettingsError as _error:
    sys.stderr.write(f"configuration error: {_error}\n")
    sys.exit(2)

try:  # code/requirements.txt of a custom handler, into this interpreter, before any worker imports the handler
    install_requirements(code_dir(_settings.model_dir), say=lambda line: sys.stderr.write(line + "\n"))
except HandlerError as _error:
    sys.stderr.write(f"custom handler error: {_error}\n")
    sys.exit(2)

# /metrics of every worker, aggregated: prometheus-client's multiprocess mode, in a folder of this server's own
# (workers inherit the variable; prometheus-client reads it when a worker imports it, after fork).
_metrics_dir = tempfile.mkdtemp(prefix="serve-metrics-")
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir

bind = f"0.0.0.0:{_settings.port}"
wsgi_app = "serve.wsgi:app"
workers = _settings.workers  # each worker owns one engine (and one copy of the model)
# gthread, except that request heads (and bodies of known length) are read by the worker's event loop, never by a
# pool thread: slow or silent clients cost a descriptor, not a thread (serve/http/worker.py, docs/reliability.md).
worker_class = "serve.http.worker.BufferingWorker"
threads = _settings.max_concurrent_requests + 8  # one per admitted stream, plus room for /ping and 429s
worker_connections = 4_096  # open connections per worker (idle ones included); the worker raises its file limit
control_socket_disable = True  # gunicorn's control socket defaults to one path in $HOME, shared by every server there
preload_app = False  # load torch/CUDA in the worker, never in the master
timeout = 300  # worker heartbeat; the gthread main loop keeps beating while requests stream
graceful_timeout = _settings.graceful_timeout  # < 30 s: SageMaker SIGKILLs 30 s after SIGTERM
keepalive = 75  # longer than the SageMaker front end's idle keep-alive
loglevel = _settings.log_level.lower()
accesslog = None  # serve.log writes one line per request with timings
limit_request_line = 8190


def when_ready(server):
    server.log.info("listening on %s; workers load the model after fork", bind)


def post_fork(server, worker):
    server.log.info("worker %s forked; loading the model", worker.pid)


def post_worker_init(worker):
    """SIGTERM starts the app's drain (503 to new work, admitted requests finish); then the worker stops its engine
    processes (they ignore a SIGTERM sent to the whole group), and gunicorn's stop runs."""
    extensions = getattr(worker.wsgi, "extensions", {})
    drain, service = extensions.get("serve.drain"), extensions.get("serve.service")
    if drain is None or service is None:
        return
    gunicorn_stop = worker.handle_exit

    def on_sigterm(sig, frame):
        drain.begin(stopping_engine(service.engine, lambda: gunicorn_stop(sig, frame)))

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.siginterrupt(signal.SIGTERM, False)


def worker_exit(server, worker):
    logging.getLogger("serve").info("worker %s exiting", worker.pid)


def child_exit(server, worker):
    """A gone worker's live gauges leave the sums (its counters stay: they happened)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid, _metrics_dir)


def on_exit(server):
    shutil.rmtree(_metrics_dir, ignore_errors=True)
