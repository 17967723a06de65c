"""A process that makes synchronous calls (``Dispatcher.invoke``) in a loop until it is killed,
so that reply-to rows are in flight when a fault hits.

    python -m tests.chaos.invoker --dsn DSN --trigger 3 --application-name chaos-inv \
        --parallel 4 --time-limit 2

It runs a full dispatcher of its own (invoke needs one): it also claims async rows.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys

import anyio

from dispatcher import Dispatcher, DispatcherConfig, InvokeTimeout
from tests.chaos.handlers import registry


async def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--trigger", type=int, required=True)
    parser.add_argument("--application-name", default="chaos-invoker")
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--time-limit", type=float, default=2.0)
    args = parser.parse_args(argv)
    config = DispatcherConfig(
        application_name=args.application_name, concurrency=2 * args.parallel, poll_interval=0.1
    )
    dispatcher = Dispatcher(args.dsn, registry, config=config)
    counter = itertools.count()

    async def call_forever() -> None:
        while True:
            with contextlib.suppress(InvokeTimeout):
                await dispatcher.invoke(
                    args.trigger, {"n": next(counter), "ms": [5, 30]}, time_limit=args.time_limit
                )

    async with anyio.create_task_group() as tg:
        await tg.start(dispatcher.run)
        for _ in range(args.parallel):
            tg.start_soon(call_forever)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1:])
