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


def get_ctx(request: Request) -> ControllerContext:
    ctx: ControllerContext = request.app.state.ctx
    return ctx


def get_session(request: Request) -> Iterator[Session]:
    ctx = get_ctx(request)
    session = ctx.session_factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


Ctx = Annotated[ControllerContext, Depends(get_ctx)]
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
