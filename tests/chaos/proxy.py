"""A proxy in front of Postgres that passes bytes through unchanged but passes on the
server's end of a connection late, as a network does when the error message and the FIN
travel separately:

    python -m tests.chaos.proxy --listen DIR_OR_PORT --target DIR_OR_HOST:PORT --delay 0.3

A client whose statement the server aborts (``pg_terminate_backend``, a shutdown) then reads
the error before it sees the connection close, and may act on it (a ROLLBACK) on a half-dead
connection. The harness runs it as a process of its own (see ``Harness.slow_close_proxy``).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from functools import partial

import anyio
import anyio.abc

PG_SOCKET = ".s.PGSQL.{port}"


async def _connect(target: str, port: int) -> anyio.abc.ByteStream:
    if target.startswith("/"):
        return await anyio.connect_unix(f"{target}/{PG_SOCKET.format(port=port)}")
    host, _, tcp_port = target.rpartition(":")
    return await anyio.connect_tcp(host, int(tcp_port))


async def _handle(target: str, port: int, delay: float, client: anyio.abc.ByteStream) -> None:
    async with client:
        try:
            server = await _connect(target, port)
        except OSError:
            return
        async with server, anyio.create_task_group() as tg:
            closed = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)

            async def upstream() -> None:
                with contextlib.suppress(*closed):
                    async for chunk in client:
                        await server.send(chunk)
                tg.cancel_scope.cancel()  # the client hung up: so do we

            async def downstream() -> None:
                with contextlib.suppress(*closed):
                    async for chunk in server:
                        await client.send(chunk)
                await anyio.sleep(delay)  # the late end: the fault itself
                tg.cancel_scope.cancel()

            tg.start_soon(upstream)
            tg.start_soon(downstream)


async def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True, help="socket directory, or a TCP port")
    parser.add_argument("--target", required=True, help="socket directory, or host:port")
    parser.add_argument("--port", type=int, default=5432, help="Postgres port (socket name)")
    parser.add_argument("--delay", type=float, default=0.3)
    args = parser.parse_args(argv)
    listener: anyio.abc.Listener[anyio.abc.ByteStream]
    if args.listen.startswith("/"):
        listener = await anyio.create_unix_listener(
            f"{args.listen}/{PG_SOCKET.format(port=args.port)}"
        )
    else:
        listener = await anyio.create_tcp_listener(
            local_host="127.0.0.1", local_port=int(args.listen)
        )
    async with listener:
        await listener.serve(partial(_handle, args.target, args.port, args.delay))


if __name__ == "__main__":
    anyio.run(main, sys.argv[1:])
