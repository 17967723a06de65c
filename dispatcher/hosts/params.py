"""The emit statements in each driver's parameter style.

:mod:`dispatcher.sql.emit` writes them with asyncpg's ``$n`` parameters, each with its type
cast (``$6::jsonb[]``); psycopg's and Django's cursors take ``%(pn)s``, SQLAlchemy's
``text()`` takes ``:pn``. Each rewritten statement is cached: there are only a few.
"""

from __future__ import annotations

import re
from functools import cache
from typing import TYPE_CHECKING

from dispatcher.hosts.protocols import Args

if TYPE_CHECKING:  # types only: importing the library must not load a driver
    from sqlalchemy.sql.elements import TextClause

# Every parameter of the emit statements carries its type (``$6::jsonb[]``).
_PARAMETER = re.compile(r"\$(\d+)::(\w+(?:\[\])?)")


def _rewrite(statement: str, replacement: str) -> str:
    rewritten = _PARAMETER.sub(replacement, statement)
    if "$" in rewritten:
        raise ValueError(f"a parameter without a type cast in: {statement}")
    return rewritten


@cache
def pyformat(statement: str) -> str:
    """``statement`` for psycopg's and Django's cursors: ``$1::uuid`` is ``%(p1)s::uuid``."""
    return _rewrite(statement.replace("%", "%%"), r"%(p\1)s::\2")


@cache
def sqlalchemy_text(statement: str) -> TextClause:
    """``statement`` for SQLAlchemy: ``$1::uuid`` is ``CAST(:p1 AS uuid)``, because
    SQLAlchemy reads ``:p1::uuid`` as a parameter named ``p``."""
    from sqlalchemy import text

    return text(_rewrite(statement, r"CAST(:p\1 AS \2)"))


def named(args: Args) -> dict[str, object]:
    """``args`` by the names the rewritten statements use: ``p1``, ``p2``, ..."""
    return {f"p{i}": arg for i, arg in enumerate(args, 1)}
