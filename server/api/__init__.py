"""The HTTP layer: dependencies, the one error-to-response table, and the routers."""
