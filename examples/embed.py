"""A help desk that receives its own mail: pymta inside an asyncio application.

Mail to a member of staff (a dict) or to any address at tickets.example.com (a coroutine that
would ask the application's database) is accepted; everything else gets ``550 5.1.1``. Each
accepted message is handed to the application by an async callback, which puts it on a queue
that the application's own task reads.

    python examples/embed.py [--port 2525] [--once]
    swaks --server 127.0.0.1:2525 --to 42@tickets.example.com --header 'Subject: printer'

``--once`` stops after the first ticket (the test of this example uses it). SIGINT or
SIGTERM stops the server cleanly: a message being received gets its answer first.
"""

from __future__ import annotations

import argparse
import asyncio
import email
import os
import signal
import sys
import tempfile
from collections.abc import Sequence

from pymta import (
    MTA,
    Config,
    ConfigError,
    QueuedMessage,
    Recipient,
    load_config,
    message_bytes,
)

STAFF = {"help@example.com": True, "boss@example.com": True}     # True: a local recipient


async def ticket_address(address: str) -> bool:
    """Any address at tickets.example.com opens or continues a ticket."""
    await asyncio.sleep(0)          # here the application would ask its database
    return address.lower().endswith("@tickets.example.com")


class HelpDesk:
    def __init__(self, once: bool) -> None:
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.once = once
        self.done = asyncio.Event()

    async def deliver(self, msg: QueuedMessage, rcpts: Sequence[Recipient]) -> None:
        """pymta's delivery agent for local recipients. Returning means "delivered": the
        message leaves pymta's queue, so a real application stores it durably first.
        Raising TemporaryFailure makes pymta retry later; any other exception does too."""
        await self.inbox.put(message_bytes(msg))

    async def work(self) -> None:
        """The application's own task: one ticket per message."""
        while True:
            message = email.message_from_bytes(await self.inbox.get())   # never raises
            print(f"ticket from {message['From']}: {message['Subject']}", flush=True)
            self.inbox.task_done()
            if self.once:
                self.done.set()


async def run(config: Config, desk: HelpDesk) -> None:
    async with MTA(config, lookups=[STAFF, ticket_address], agent=desk.deliver) as mta:
        host, port = mta.addresses["smtp"][0]
        print(f"help desk listening on {host}:{port}", flush=True)
        worker = asyncio.create_task(desk.work())
        await desk.done.wait()
    # The server has stopped (no delivery under way): finish what it handed over, then stop.
    await desk.inbox.join()
    worker.cancel()


async def main(port: int, once: bool) -> int:
    desk = HelpDesk(once)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, desk.done.set)
    # The queue lives in the state directory; a real application keeps it (mail accepted but
    # not yet handed over survives a restart there), this example throws it away.
    with tempfile.TemporaryDirectory(prefix="helpdesk-") as state:
        try:
            config = load_config({
                "MYHOSTNAME": "desk.example.com",
                "MAIL_DOMAIN": "example.com tickets.example.com",
                "PYMTA_SMTP_LISTEN": f"127.0.0.1:{port}",
                "PYMTA_STATE_DIR": state,
                "PYMTA_SPF": "no", "PYMTA_DMARC": "no",     # local test mail: no DNS needed
                "PYMTA_DKIM_SIGN": "no", "PYMTA_ARC": "no",     # no keys to make and publish
            })
            await run(config, desk)
        except (ConfigError, OSError) as exc:     # a bad port, a port in use
            print(f"help desk: {exc}", file=sys.stderr)
            return 1
    print("help desk stopped", flush=True)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=os.environ.get("PORT", "2525"),
                        help="SMTP port on 127.0.0.1 (default: $PORT or 2525; 0: any free)")
    parser.add_argument("--once", action="store_true", help="stop after the first ticket")
    args = parser.parse_args()
    raise SystemExit(asyncio.run(main(args.port, args.once)))
