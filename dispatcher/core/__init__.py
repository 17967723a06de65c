"""The pure core: models, validation, retry policy math and outcome routing.

Nothing in this package touches the database, the event loop or the clock; everything it
decides is a value computed from its arguments, so it can be tested exhaustively.
"""
