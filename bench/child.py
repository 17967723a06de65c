"""Parent side of the worker protocol (see :mod:`bench.worker`): start children, wait for
``READY``, send ``GO``/``STOP``, follow their progress lines, collect their JSON results."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from bench.core import REPO_DIR


class ChildFailed(RuntimeError):
    pass


class Child:
    """One child process speaking the READY/GO/P/STOP/DONE protocol."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, out: Path) -> None:
        self.name = name
        self.proc = proc
        self.out = out
        self.progress: dict[str, Any] = {}
        self.done = asyncio.Event()
        self._ready = asyncio.Event()
        self._changed = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    async def start(cls, name: str, argv: Sequence[str], *, cwd: Path = REPO_DIR) -> Child:
        out = Path(tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".json")[1])
        proc = await asyncio.create_subprocess_exec(
            *argv,
            "--out",
            str(out),
            cwd=cwd,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        return cls(name, proc, out)

    @classmethod
    async def worker(cls, name: str, *args: str) -> Child:
        """A ``python -m bench.worker`` child in this interpreter."""
        return await cls.start(name, [sys.executable, "-m", "bench.worker", *args])

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while True:
            raw = await self.proc.stdout.readline()
            if not raw:
                break
            line = raw.decode().strip()
            if line == "READY":
                self._ready.set()
            elif line == "DONE":
                self.done.set()
            elif line.startswith("P "):
                self.progress = json.loads(line[2:])
                self._changed.set()
                self._changed = asyncio.Event()
        self._ready.set()
        self.done.set()
        self._changed.set()

    async def until(self, key: str) -> None:
        """Wait for a progress line with a true ``key`` (or for the child to end)."""
        while not self.progress.get(key) and not self.done.is_set():
            await self._changed.wait()

    async def ready(self, within: float = 60.0) -> None:
        await asyncio.wait_for(self._ready.wait(), within)
        if self.proc.returncode is not None:
            raise ChildFailed(f"{self.name} exited with {self.proc.returncode} before READY")

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((line + "\n").encode())

    def go(self) -> int:
        """Send GO; returns the monotonic time it was sent (ns)."""
        now = time.monotonic_ns()
        self.send("GO")
        return now

    async def finish(self, *, stop: bool = True, within: float = 120.0) -> dict[str, Any]:
        """Ask the child to stop (consumers), wait for it, return its JSON result."""
        if stop and self.proc.returncode is None:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.send("STOP")
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            code = await asyncio.wait_for(self.proc.wait(), within)
        except TimeoutError:
            self.kill()
            raise ChildFailed(f"{self.name} did not exit within {within:g}s") from None
        await self._reader
        if code != 0:
            raise ChildFailed(f"{self.name} exited with {code}")
        try:
            return dict(json.loads(self.out.read_text()))
        finally:
            self.out.unlink(missing_ok=True)

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        self.out.unlink(missing_ok=True)


@contextlib.asynccontextmanager
async def children() -> AsyncIterator[list[Child]]:
    """Collects children; kills any still running when the block exits (errors, Ctrl-C)."""
    started: list[Child] = []
    try:
        yield started
    finally:
        for c in started:
            if c.proc.returncode is None:
                c.kill()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(c.proc.wait(), 5)
