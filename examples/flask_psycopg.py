"""Flask with psycopg 3 (sync): a view changes an account's plan and emits the mutation in the
same ``with conn.transaction()`` block, so both commit or neither.

Needs ``pip install flask 'dispatcher[psycopg]'``. After the setup in docs/embedding.md
("Recipes that run"):

    export DATABASE_URL=postgresql://postgres@127.0.0.1/postgres
    flask --app examples/flask_psycopg.py run
    curl -X PUT localhost:5000/accounts/42/plan -H 'content-type: application/json' \
        -d '{"plan": "pro"}'

The "enterprise" plan is declined after the emit (402): the update and the outbox rows roll
back together. ``DISPATCHER_SCHEMA`` (or ``schema=``) names the library's schema.
"""

from __future__ import annotations

import os
from typing import Any

import psycopg
from flask import Flask, abort, request

from dispatcher import Emitter, Mutation, Op


class PaymentDeclined(Exception):
    """The request's work failing after the emit."""


def charge(account_id: int, plan: str) -> None:
    """Stands for the rest of the request's work: a payment, declined for one plan."""
    if plan == "enterprise":
        raise PaymentDeclined(f"account {account_id}: the {plan} plan is sold by our sales team")


def create_app(dsn: str | None = None, *, schema: str | None = None) -> Flask:
    dsn = dsn or os.environ["DATABASE_URL"]
    emitter = Emitter(schema=schema or os.environ.get("DISPATCHER_SCHEMA", "dispatcher"))
    app = Flask(__name__)

    @app.put("/accounts/<int:account_id>/plan")
    def change_plan(account_id: int) -> Any:
        plan = request.get_json()["plan"]
        # A connection per request keeps the example short; use a pool (psycopg_pool) for real.
        with psycopg.connect(dsn) as conn:
            try:
                with conn.transaction():
                    updated = conn.execute(
                        "UPDATE accounts SET plan = %s WHERE id = %s", (plan, account_id)
                    )
                    if updated.rowcount == 0:
                        abort(404, f"no account {account_id}")
                    mutation = Mutation(
                        "acme", "users", f"users/{account_id}", Op.PUT, {"plan": plan}
                    )
                    emitter.emit_sync(conn, mutation)
                    charge(account_id, plan)  # raising rolls back the update and the emit
            except PaymentDeclined as declined:
                return {"detail": str(declined)}, 402
        return {"id": account_id, "plan": plan}

    return app
