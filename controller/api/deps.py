"""FastAPI dependencies and their `Annotated` aliases: the context and a per-request session.

Rule: a request's database work is one transaction. The session commits when the endpoint
returns and rolls back when it raises; the dependency is function-scoped, so the commit (and
any error it raises) happens before the response is sent, never after the client saw success.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from fleet.controller.context import ControllerContext
from fleet.controller.db import session_scope


def get_ctx(request: Request) -> ControllerContext:
    ctx: ControllerContext = request.app.state.ctx
    return ctx


def get_session(request: Request) -> Iterator[Session]:
    with session_scope(get_ctx(request).session_factory) as session:
        yield session


Ctx = Annotated[ControllerContext, Depends(get_ctx)]
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
