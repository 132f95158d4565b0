"""`rlx serve`: the app under uvicorn, with the model loading behind a live /health.

The socket is bound first and the model loads in a thread, so a supervisor sees 503 on /health
until it is ready (and a load failure ends the process with the usual `rlx: error:` message).
SIGTERM drains: the server stops admitting (new requests get 503, the listening socket closes),
requests in flight finish within `grace_s` (uvicorn's graceful shutdown, then the engine's),
and the process exits 0. Ctrl-C does the same but exits 130, as every rlx command does.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import uvicorn

from rlx.errors import RlxError
from rlx.serve import structured
from rlx.serve.app import ServerState, create_app
from rlx.serve.backend import Backend, EngineOptions, check_inputs, load_backend
from rlx.serve.metrics import Metrics


class _Server(uvicorn.Server):
    """uvicorn's server; a SIGTERM also marks the state draining and is not re-raised at exit
    (a drained server exits 0)."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.state.draining = True
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM:
            self._captured_signals.remove(sig)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _setup_logging() -> None:
    logger = logging.getLogger("rlx.serve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[rlx] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def serve(model: str | Path, options: EngineOptions, *, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, allowed_origins: Sequence[str] = (), served_name: str | None = None,
          grace_s: float = 30.0) -> int:
    """Run until SIGTERM / Ctrl-C; 0 after a drain. A model that fails to load raises its RlxError."""
    check_inputs(model, options)
    _setup_logging()
    if not is_loopback(host) and not api_key:
        print(f"[rlx] warning: serving on {host} without an API key: anyone who can reach this port can use "
              "the model (pass --api-key or set RLX_API_KEY)", file=sys.stderr, flush=True)
    if not structured.available():
        print(f"[rlx] note: structured output (response_format json) is off: xgrammar is not installed "
              f"({structured.STRUCTURED_EXTRA} turns it on)", file=sys.stderr, flush=True)
    state = ServerState(metrics=Metrics(lambda: state.stats()), served_name=served_name, api_key=api_key)
    server: _Server | None = None
    failure: list[BaseException] = []

    def load() -> Backend:
        try:
            return load_backend(model, options, served_name=served_name)
        except BaseException as err:
            failure.append(err)
            if server is not None:
                server.should_exit = True
            raise

    app = create_app(state, allowed_origins=allowed_origins, load=load, grace_s=grace_s)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=max(int(grace_s), 1), lifespan="on")
    server = _Server(config, state)
    print(f"[rlx] listening on http://{host}:{port} (the model loads now; /health answers 200 when ready)",
          file=sys.stderr, flush=True)
    server.run()
    if failure:
        err = failure[0]
        raise err if isinstance(err, RlxError) else RlxError(f"the model failed to load: {err}",
                                                             hint="see the message above")
    if not server.started:
        raise RlxError(f"could not listen on {host}:{port}", hint="the port may be in use: pass another --port")
    return 0
