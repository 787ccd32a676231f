"""Handlers for test_asyncio_and_thread_workers.py, loaded by its workers with --handlers.

Each logs what happens to it with the request's token, so the test reads from the worker's log
that a cancel, a deadline or a shutdown reached the asyncio Task (and its finally block ran).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import httpx
from twisted.logger import Logger
from zope.interface import implementer

from relaybus.interfaces import IRequestHandler, IRequestStream
from relaybus.worker import HandlerRequest

log = Logger(namespace="relaybus.test")


@implementer(IRequestHandler)
class TaskProbe:
    """Payload {"token", "count", "delayMs"}: streams count chunks delayMs apart as an asyncio
    Task, logging its start, its cancellation and its finally block."""

    requestType = "taskProbe"
    idempotent = False
    runsIn = "asyncio"

    async def handle(self, request: HandlerRequest, stream: IRequestStream) -> Any:
        token = request.payload["token"]
        task = asyncio.current_task()
        log.info("Task started {token} (in a Task: {inTask})", token=token,
                 inTask=task is not None)
        try:
            for index in range(request.payload["count"]):
                await asyncio.sleep(request.payload["delayMs"] / 1000)
                await stream.sendChunk(index)
            return {"token": token}
        except asyncio.CancelledError:
            log.info("Task cancelled {token}", token=token)
            raise
        finally:
            await asyncio.sleep(0.01)  # cleanup that itself awaits, like closing a session
            log.info("Task finally {token}", token=token)


@implementer(IRequestHandler)
class HttpLines:
    """Payload {"lines": N}: GETs the test's local HTTP server with httpx's asyncio client and
    streams each line of its (slow, streamed) body as a chunk."""

    requestType = "httpLines"
    idempotent = True
    runsIn = "asyncio"

    async def handle(self, request: HandlerRequest, stream: IRequestStream) -> Any:
        url = f"{os.environ['RELAYBUS_TEST_HTTP_URL']}/lines?n={int(request.payload['lines'])}"
        received = 0
        async with httpx.AsyncClient(timeout=10) as client:
            async with client.stream("GET", url) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if line:
                        await stream.sendChunk(line)
                        received += 1
        return {"lines": received, "status": response.status_code}


@implementer(IRequestHandler)
class ThreadHold:
    """Payload {"holdMs"}: blocks its thread; answers how many such calls ran at once (at most
    --threads) and in which thread."""

    requestType = "threadHold"
    idempotent = False
    runsIn = "thread"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._mostAtOnce = 0

    def handle(self, request: HandlerRequest, stream: IRequestStream) -> Any:
        with self._lock:
            self._running += 1
            self._mostAtOnce = max(self._mostAtOnce, self._running)
        try:
            stream.sendChunk({"thread": threading.current_thread().name})
            time.sleep(request.payload["holdMs"] / 1000)
            with self._lock:
                return {"mostAtOnce": self._mostAtOnce}
        finally:
            with self._lock:
                self._running -= 1


taskProbe = TaskProbe()
httpLines = HttpLines()
threadHold = ThreadHold()
