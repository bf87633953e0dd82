"""`coap-auth serve --workers N`: N `serve` processes on one UDP port, started, watched and
stopped by one supervisor; the only way coap-auth shares a port between processes.

The supervisor checks that the port is free (a bind without SO_REUSEPORT), initialises the
data directory once, then starts the workers: `serve` again, with the same options in the same
environment and directory, plus WORKER_OPTION, under which a worker binds with SO_REUSEPORT
(the kernel then spreads sources over the workers, each source always to the same one) and
stops when the supervisor goes away. One worker ending ends them all: the supervisor stops the
others and exits non-zero, for a service manager to restart the whole.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
from typing import Any

from coap_auth.cli.runtime import opened_service
from coap_auth.config import Settings
from coap_auth.errors import OperatorError
from coap_auth.udp import check_port_free

# Hidden `serve` option: the read end of a pipe whose write end only the supervisor holds. A
# worker binds with SO_REUSEPORT, and stops when the pipe reaches end of file (the supervisor
# is gone, even killed).
WORKER_OPTION = "--worker-pipe"
# Hidden `serve` option: which worker this is, from 0 (its metrics listener is on
# metrics_port + index).
WORKER_INDEX_OPTION = "--worker-index"
# The `serve` options that feed Settings (main()'s flags), given to every worker as given to
# the supervisor; the environment and the working directory are inherited.
FORWARDED_OPTIONS = {
    "--data-dir": "data_dir",
    "--config": "config",
    "--store": "store",
    "--bind": "bind",
    "--port": "port",
    "--signing-alg": "signing_alg",
}
LISTENING = "coap-auth listening on "
MAX_PORT = 65535
STOP_TIMEOUT = 10  # s a worker has to stop before it is killed
# The exit status of a `serve` that refused its input; its stderr line said why.
REFUSED = 2

log = logging.getLogger("coap_auth.workers")


async def supervise(args: argparse.Namespace, settings: Settings) -> int:
    """Serve with `settings.workers` worker processes until SIGINT or SIGTERM (forwarded to
    them; 0) or until one of them ends (the others are stopped; non-zero). Raises
    OperatorError, or BindError when the port is not free."""
    if settings.port == 0:
        raise OperatorError("workers above 1 need a fixed port: port 0 gives each its own")
    if settings.metrics_port and settings.metrics_port + settings.workers - 1 > MAX_PORT:
        raise OperatorError(
            f"metrics_port {settings.metrics_port} leaves no room for {settings.workers} workers"
            f" (worker i listens on metrics_port + i, at most {MAX_PORT})"
        )
    await check_port_free((settings.bind, settings.port), log)
    # Workers racing to create a data directory could each write a different master key.
    async with opened_service(settings, create=True):
        read_end, write_end = os.pipe()  # not inherited, but for pass_fds
        workers: list[asyncio.subprocess.Process] = []
        try:
            try:
                for index in range(settings.workers):
                    workers.append(await _start_worker(args, read_end, index))
            finally:
                os.close(read_end)
            return await _watch(workers)
        finally:
            await _stop(workers, signal.SIGTERM)
            os.close(write_end)


def worker_settings(settings: Settings, index: int) -> Settings:
    """A worker's settings: the supervisor's, but for its own metrics listener (each worker
    counts for itself)."""
    if not settings.metrics_port:
        return settings
    return dataclasses.replace(settings, metrics_port=settings.metrics_port + index)


async def _start_worker(
    args: argparse.Namespace, read_end: int, index: int
) -> asyncio.subprocess.Process:
    # -P: nothing importable from the working directory (as `-c` would allow) shadows a module.
    argv = [
        sys.executable,
        "-P",
        "-c",
        "import sys; from coap_auth.cli import main; sys.exit(main())",
    ]
    argv.append("serve")
    for option, name in FORWARDED_OPTIONS.items():
        value = getattr(args, name, None)
        if value is not None:
            argv += [option, str(value)]
    argv += [WORKER_OPTION, str(read_end), WORKER_INDEX_OPTION, str(index)]
    return await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,  # its listening line, for the supervisor
        pass_fds=(read_end,),
        # Its own process group: a terminal's Ctrl-C reaches the supervisor only, which
        # forwards it, so that a worker stopping is never taken for a worker failing.
        start_new_session=True,
    )


async def _watch(workers: list[asyncio.subprocess.Process]) -> int:
    loop = asyncio.get_running_loop()
    received: list[int] = []
    stop = asyncio.Event()

    def request_stop(signum: int) -> None:
        received.append(signum)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, request_stop, signum)
    urls: list[asyncio.Future[str]] = [loop.create_future() for _ in workers]
    outputs = [
        asyncio.create_task(_read_output(w, url)) for w, url in zip(workers, urls, strict=True)
    ]
    ready: asyncio.Future[list[str]] = asyncio.gather(*urls)
    stopped: asyncio.Future[Any] = asyncio.create_task(stop.wait())
    ended = asyncio.create_task(_first_to_end(workers))
    try:
        await asyncio.wait([ready, stopped, ended], return_when=asyncio.FIRST_COMPLETED)
        if ready.done() and not (stopped.done() or ended.done()):
            print(f"{LISTENING}{ready.result()[0]}", flush=True)
            await asyncio.wait([stopped, ended], return_when=asyncio.FIRST_COMPLETED)
        if stopped.done():
            print("coap-auth stopping", flush=True)
            await _stop(workers, received[0])
            return 0
        worker = ended.result()
        return _ended(worker, workers.index(worker) + 1, listening=ready.done())
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        pending: list[asyncio.Future[Any]] = [ready, stopped, ended, *outputs]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def _read_output(worker: asyncio.subprocess.Process, url: asyncio.Future[str]) -> None:
    """Set `url` from the worker's listening line, and read its output to the end, so that it
    never blocks on a full pipe."""
    assert worker.stdout is not None
    async for line in worker.stdout:
        text = line.decode(errors="replace").rstrip("\n")
        if text.startswith(LISTENING) and not url.done():
            url.set_result(text.removeprefix(LISTENING))


async def _first_to_end(workers: list[asyncio.subprocess.Process]) -> asyncio.subprocess.Process:
    waits = {asyncio.create_task(w.wait()): w for w in workers}
    try:
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        return waits[next(iter(done))]
    finally:
        for task in waits:
            task.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


def _ended(worker: asyncio.subprocess.Process, number: int, *, listening: bool) -> int:
    """The supervisor's exit status after `worker` ended unasked, with one line on stderr
    unless the worker's own line said why (it refused its input while starting)."""
    status = worker.returncode
    if status == REFUSED and not listening:
        return REFUSED
    how = f"was killed by signal {-status}" if status and status < 0 else f"exited {status}"
    print(
        f"coap-auth: error: worker {number} (pid {worker.pid}) {how}; stopping the others",
        file=sys.stderr,
        flush=True,
    )
    return status if status and status > 0 else 1


async def _stop(workers: list[asyncio.subprocess.Process], signum: int) -> None:
    """Send `signum` to every worker still running and wait for them; kill any that take
    longer than STOP_TIMEOUT."""
    for worker in workers:
        if worker.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                worker.send_signal(signum)
    for worker in workers:
        try:
            await asyncio.wait_for(worker.wait(), STOP_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                worker.kill()
            await worker.wait()
