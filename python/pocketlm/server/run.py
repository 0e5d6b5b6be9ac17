"""Loading the models and running the application with uvicorn, until Ctrl-C or SIGTERM."""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import sys

from pocketlm.server.models import ModelRegistry, ServedModel, model_id

GRACE_SECONDS = 5  # after a stop signal, how long responses still being sent may take to end


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def load_models(specs: list[str], pooling: str | None = None, max_tokens_limit: int | None = None,
                **engine_kwargs) -> ModelRegistry:
    from pocketlm.engine import Engine

    served = []
    for spec in specs:
        print(f"pocketlm: loading {spec} ...", file=sys.stderr, flush=True)
        engine = Engine(spec, **engine_kwargs)
        served.append(ServedModel(model_id(spec), engine, pooling=pooling, max_tokens_limit=max_tokens_limit))
    return ModelRegistry(served)


def serve(specs: list[str], *, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
          cors_origins: list[str] | None = None, pooling: str | None = None, max_tokens_limit: int | None = None,
          **engine_kwargs) -> int:
    """Serves the models until a stop signal; returns the exit status (0 after SIGTERM, 130 after Ctrl-C).
    Prints `pocketlm: listening on http://HOST:PORT` on standard error once it accepts connections
    (with the port the system chose for port 0)."""
    try:
        import uvicorn
    except ImportError:
        raise ImportError("pocketlm serve needs the server extra: pip install 'pocketlm[server]' "
                          "(FastAPI and uvicorn)") from None
    from pocketlm.server.app import create_app

    registry = load_models(specs, pooling=pooling, max_tokens_limit=max_tokens_limit, **engine_kwargs)
    app = create_app(registry, api_key=api_key, cors_origins=cors_origins)
    state = app.state.pocketlm
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger = logging.getLogger("pocketlm.server")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

    sock = _bind(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    shown_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=GRACE_SECONDS, server_header=False)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # A signal handler may interrupt a thread holding a scheduler's lock: cancel from the loop.
            loop = getattr(self, "_loop", None)
            if loop is not None:
                loop.call_soon_threadsafe(state.shut_down)
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):  # uvicorn's raises the signals again at the end; the exit status tells
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, h in original.items():
                    signal.signal(sig, h)

        async def startup(self, sockets=None):
            import asyncio

            self._loop = asyncio.get_running_loop()
            await super().startup(sockets=sockets)
            if not self.should_exit:
                print(f"pocketlm: listening on http://{shown_host}:{bound_port} (models: "
                      f"{', '.join(m.id for m in registry)})", file=sys.stderr, flush=True)

    server = Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        for m in registry:
            m.engine.scheduler.close()
            m.embedder.shutdown(wait=False, cancel_futures=True)
    print("pocketlm: stopped", file=sys.stderr, flush=True)
    return 130 if signal.SIGINT in server._captured_signals else 0
