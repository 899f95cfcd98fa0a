"""``DirectRoute``: a FastAPI route for the one path whose CPU cost is the server's throughput.

FastAPI documents a ``DirectRoute`` like any other route (body model, response model, errors),
but its handler skips the dependency solver, the thread pool and response validation. In this
FastAPI (0.165), through the whole app (middleware, routing, body, response), an endpoint that
does nothing cost about 500 µs of CPU per request as an ordinary route with a body, a Bearer
dependency and a session dependency, and about 140 µs as a ``DirectRoute`` (measured
in-process while building this).

The endpoint takes exactly ``(request, body)``: the request (for ``app.state`` and the
headers) and one pydantic model parsed from the JSON body; it returns a pydantic model. A body
that is not JSON, or does not validate, raises ``RequestValidationError`` as FastAPI's own
parsing does, so the one error table (``server.api.errors``) answers it.
"""

from __future__ import annotations

import email.message
import inspect
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, get_type_hints

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError


def _is_json(content_type: str | None) -> bool:
    """``application/json`` or ``application/*+json`` (what FastAPI's strict parsing takes)."""
    if content_type == "application/json":  # nearly every request: skip the parser
        return True
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


class DirectRoute(APIRoute):
    """A route whose endpoint is ``async def (request: Request, body: Model) -> Model``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint: Callable[[Request, Any], Awaitable[BaseModel]] = self.endpoint
        hints = get_type_hints(endpoint)
        names = list(inspect.signature(endpoint).parameters)
        model = hints.get(names[-1]) if len(names) == 2 else None
        if (
            not inspect.iscoroutinefunction(endpoint)
            or hints.get(names[0]) is not Request
            or not (isinstance(model, type) and issubclass(model, BaseModel))
        ):
            raise TypeError(f"{self.path}: a DirectRoute endpoint is async (request, body)")
        body_model: type[BaseModel] = model
        exclude_none = self.response_model_exclude_none
        status = self.status_code or 200

        async def handler(request: Request) -> Response:
            if not _is_json(request.headers.get("content-type")):
                raise RequestValidationError(
                    [{"type": "model_type", "loc": ("body",), "msg": "the body must be JSON"}]
                )
            try:
                body = body_model.model_validate_json(await request.body())
            except ValidationError as e:
                errors = e.errors(include_url=False, include_input=False, include_context=False)
                raise RequestValidationError(
                    [{**err, "loc": ("body", *err["loc"])} for err in errors]
                ) from None
            result = await endpoint(request, body)
            return Response(
                result.model_dump_json(exclude_none=exclude_none),
                status_code=status,
                media_type="application/json",
            )

        return handler
