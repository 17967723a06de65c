"""Django without a project: settings configured in code from a DSN, then an account's plan
change and its emit in one ``transaction.atomic()`` block (``dispatcher.contrib.django``), so
both commit or neither.

Needs ``pip install 'dispatcher[django,psycopg]'`` (Django and its psycopg 3 driver). After the
setup in docs/embedding.md ("Recipes that run"):

    export DATABASE_URL=postgresql://postgres@127.0.0.1/postgres
    python examples/django_app.py 42 pro

The "enterprise" plan is declined after the emit: the update and the outbox rows roll back
together, and the command exits with status 1. ``DISPATCHER_SCHEMA`` names the library's
schema.
"""

from __future__ import annotations

import os
import sys

import django
from django.conf import settings
from django.db import connection, transaction
from psycopg.conninfo import conninfo_to_dict

from dispatcher import Emitter, Mutation, Op
from dispatcher.contrib import django as dispatcher_django


class PaymentDeclined(Exception):
    """The work failing after the emit."""


def charge(account_id: int, plan: str) -> None:
    """Stands for the rest of your work: a payment, declined for one plan."""
    if plan == "enterprise":
        raise PaymentDeclined(f"account {account_id}: the {plan} plan is sold by our sales team")


def configure(dsn: str) -> None:
    """Django's settings, in code: one PostgreSQL database, read from the DSN by psycopg."""
    params = conninfo_to_dict(dsn)  # host, port, user, ... as psycopg takes them
    database = {"ENGINE": "django.db.backends.postgresql", "NAME": params.pop("dbname", None)}
    settings.configure(DATABASES={"default": {**database, "OPTIONS": params}}, USE_TZ=True)
    django.setup()


def change_plan(account_id: int, plan: str, emitter: Emitter) -> None:
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("UPDATE accounts SET plan = %s WHERE id = %s", [plan, account_id])
            if cursor.rowcount == 0:
                raise LookupError(f"no account {account_id}")
        mutation = Mutation("acme", "users", f"users/{account_id}", Op.PUT, {"plan": plan})
        dispatcher_django.emit(mutation, emitter=emitter)
        charge(account_id, plan)  # raising rolls back the update and the emit


def main(argv: list[str]) -> int:
    account_id, plan = int(argv[0]), argv[1]
    configure(os.environ["DATABASE_URL"])
    emitter = Emitter(schema=os.environ.get("DISPATCHER_SCHEMA", "dispatcher"))
    try:
        change_plan(account_id, plan, emitter)
    except PaymentDeclined as declined:
        print(f"declined, nothing changed: {declined}", file=sys.stderr)
        return 1
    print(f"account {account_id} is on {plan}; its outbox rows are committed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
