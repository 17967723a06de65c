"""Integrations with web frameworks, each behind its own extra (``pip install
'dispatcher[django]'`` for :mod:`dispatcher.contrib.django`)."""
