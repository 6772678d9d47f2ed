"""``pymta learn spam|ham FILE...``: teach the configured spam engine (what ``sa-learn --spam``
and ``--ham`` do in the image, against spamd or rspamd instead of a local Bayes database).

Each file is one message; the files are left where they are. A line on stdout per file taught;
a line on stderr per file that was not, and then exit status 1, so a script sees at once
which files to keep. No engine configured is a configuration error (exit 2).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from pymta.config.errors import ConfigError
from pymta.config.model import Config
from pymta.content.learn import LearnError, SpamClient, engine_name, learn_file, spam_client


def run(args: argparse.Namespace, config: Config) -> int:
    """Teach ``args.files`` as ``args.kind``; 0 when every file was taught, else 1."""
    client = spam_client(config)
    if client is None:
        raise ConfigError("PYMTA_SPAMD or PYMTA_RSPAMD: not set")
    failed = asyncio.run(_learn_all(client, args.files, args.kind == "spam"))
    return 1 if failed else 0


async def _learn_all(client: SpamClient, files: list[str], spam: bool) -> int:
    """One file after the other (the engine's own concurrency is for the mail); returns the
    number of files that failed, each reported on stderr."""
    kind, engine = ("spam" if spam else "ham"), engine_name(client)
    failed = 0
    for path in files:
        try:
            await learn_file(client, path, spam)
        except LearnError as exc:
            failed += 1
            print(f"pymta: learn {kind}: {path}: {exc}", file=sys.stderr)
            continue
        print(f"learned {kind} from {path} ({engine})")
    return failed
