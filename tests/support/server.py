"""`sdengine serve`'s app in this process: uvicorn in a thread, on 127.0.0.1 only."""

import threading
import time

from sdengine.serve.loadgen import free_port


class InProcessServer:
    def __init__(self, app, webuiapi=None):
        import uvicorn

        self.app = app
        self.webuiapi = webuiapi
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
        self.app.state.engine.close()

    def api(self, **kw):
        """A webuiapi client (AUTOMATIC1111's Python client) for this server."""
        return self.webuiapi.WebUIApi(host="127.0.0.1", port=self.port, **kw)
