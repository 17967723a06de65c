"""FastAPI with SQLAlchemy's async session (asyncpg driver): an endpoint changes an account's
plan and emits the mutation in the same ``session.begin()`` block, so both commit or neither.

Needs ``pip install fastapi uvicorn`` (SQLAlchemy and asyncpg come with dispatcher). After the
setup in docs/embedding.md ("Recipes that run"):

    export DATABASE_URL=postgresql://postgres@127.0.0.1/postgres
    uvicorn --factory examples.fastapi_sqlalchemy:create_app
    curl -X PUT localhost:8000/accounts/42/plan -H 'content-type: application/json' \
        -d '{"plan": "pro"}'

The "enterprise" plan is declined after the emit (402): the update and the outbox rows roll
back together. ``DISPATCHER_SCHEMA`` (or ``schema=``) names the library's schema.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from dispatcher import Emitter, Mutation, Op


class PlanChange(BaseModel):
    plan: str


class PaymentDeclined(Exception):
    """The request's work failing after the emit."""


async def charge(account_id: int, plan: str) -> None:
    """Stands for the rest of the request's work: a payment, declined for one plan."""
    if plan == "enterprise":
        raise PaymentDeclined(f"account {account_id}: the {plan} plan is sold by our sales team")


def create_app(dsn: str | None = None, *, schema: str | None = None) -> FastAPI:
    url = make_url(dsn or os.environ["DATABASE_URL"]).set(drivername="postgresql+asyncpg")
    engine = create_async_engine(url)
    emitter = Emitter(schema=schema or os.environ.get("DISPATCHER_SCHEMA", "dispatcher"))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await engine.dispose()

    app = FastAPI(lifespan=lifespan)

    @app.put("/accounts/{account_id}/plan")
    async def change_plan(account_id: int, change: PlanChange) -> dict[str, object]:
        try:
            async with AsyncSession(engine) as session, session.begin():
                updated = await session.execute(
                    text("UPDATE accounts SET plan = :plan WHERE id = :id"),
                    {"plan": change.plan, "id": account_id},
                )
                if updated.rowcount == 0:
                    raise HTTPException(404, f"no account {account_id}")
                mutation = Mutation(
                    "acme", "users", f"users/{account_id}", Op.PUT, {"plan": change.plan}
                )
                await emitter.emit(session, mutation)
                await charge(account_id, change.plan)  # raising rolls back the update and the emit
        except PaymentDeclined as declined:
            raise HTTPException(402, str(declined)) from declined
        return {"id": account_id, "plan": change.plan}

    return app
