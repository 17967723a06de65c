"""Benchmarks of the dispatcher against the raw SQL ceiling and pgqueuer (issue 5).

Run ``python -m bench all`` (see ``docs/benchmarks.md``); ``python -m bench --help`` lists
the scenarios and options.
"""
