# SPDX-License-Identifier: Apache-2.0
"""What ``server run`` gives uvicorn: an HTTP protocol whose shutdown does not wait for idle
connections, and the directory where its worker processes keep their metrics.

On SIGTERM uvicorn closes each idle keep-alive connection and waits until every connection is
gone. Closing a TLS connection sends close_notify and waits for the peer's, which an idle
client (a connection pool, a load balancer's idle backend connection) sends only when it next
reads: the server sat out its whole graceful-shutdown timeout (10 s) for nothing. Here an idle
connection whose response has been written out is dropped at once; a request in flight still
finishes and its connection closes after the response (``Connection: close``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

PROTOCOL = "server.serving:PromptShutdown"
"""What ``server run`` passes as uvicorn's ``http`` (an import string: workers import it)."""


class PromptShutdown(HttpToolsProtocol):
    """httptools' protocol whose shutdown aborts idle connections instead of closing them."""

    def shutdown(self) -> None:
        idle = self.cycle is None or self.cycle.response_complete
        if idle and not self.transport.get_write_buffer_size():
            self.transport.abort()
        else:
            super().shutdown()


MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
"""Where prometheus-client keeps the metric files of several processes (multiprocess mode)."""


@contextmanager
def metrics_dir() -> Iterator[Path]:
    """A new private directory (0700, empty) for the worker processes' metric files, named in
    ``PROMETHEUS_MULTIPROC_DIR`` for the processes started meanwhile, removed afterwards
    (:mod:`server.api.metrics`).

    Made in the user's runtime directory (``$XDG_RUNTIME_DIR``, a tmpfs) or else the temporary
    directory, new at every start: no count of an earlier run is summed into this one's, and
    two servers on one machine never share files. Enter it before this process imports the app:
    prometheus-client chooses its mode when it is imported.
    """
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    parent = runtime if runtime and os.path.isdir(runtime) else None
    path = Path(tempfile.mkdtemp(prefix="cardbridge-metrics-", dir=parent))
    previous = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = str(path)
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = previous
        shutil.rmtree(path, ignore_errors=True)
