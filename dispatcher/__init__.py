"""dispatcher: turn key/value mutations into reliable trigger executions through Postgres."""

from __future__ import annotations
