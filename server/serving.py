# SPDX-License-Identifier: Apache-2.0
"""uvicorn's HTTP protocol, with a shutdown that does not wait for idle connections.

On SIGTERM uvicorn closes each idle keep-alive connection and waits until every connection is
gone. Closing a TLS connection sends close_notify and waits for the peer's, which an idle
client (a connection pool, a load balancer's idle backend connection) sends only when it next
reads: the server sat out its whole graceful-shutdown timeout (10 s) for nothing. Here an idle
connection whose response has been written out is dropped at once; a request in flight still
finishes and its connection closes after the response (``Connection: close``).
"""

from __future__ import annotations

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
