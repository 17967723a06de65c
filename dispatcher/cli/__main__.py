"""``python -m dispatcher.cli``, as the ``dispatcher`` script."""

from __future__ import annotations

from dispatcher.cli import main

main()
