"""What one maildir delivery costs: unnamed files (``O_TMPFILE`` + ``linkat``) against ``tmp/``.

``python -m benchmarks.maildir_delivery`` delivers ``--count`` messages of ``--size`` bytes
into one maildir, ``--batch`` at a time through ``MaildirCommitter`` (written, then one group
flush, named in ``new/``, one fsync of ``new/`` per batch: what the local agent does when a
queue run delivers that many at once), and prints the wall and CPU time (user + system of this
process, every thread) per delivery, the median of ``--rounds`` interleaved runs:

* ``unnamed``: today's code where the file system allows it (written unnamed in ``new/``,
  linked after the flush);
* ``tmp/ fallback``: today's code with ``O_TMPFILE`` refused (a file in ``tmp/``, renamed);
* ``unnamed, fdatasync``: ``unnamed`` with one ``fdatasync`` per file instead of the batch's
  ``syncfs`` (which flushes everything dirty on the file system, other writers' data too);
* ``before``: with ``--baseline FILE``, an older ``delivery/maildir.py`` (e.g.
  ``git show HEAD:delivery/maildir.py > /tmp/maildir_before.py``), loaded beside the current
  one: the ``tmp/`` + rename code as it was.

The maildir is made under ``--dir`` (default: the system's temporary directory), so the file
system there is the one measured; say which it was with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from types import ModuleType

from pymta.delivery import maildir as current

PREFIX = b"Return-Path: <s@example.net>\r\nDelivered-To: r@example.com\r\n"


def _load_baseline(path: str) -> ModuleType:
    """``path`` as a module of ``pymta.delivery`` (its relative imports resolve there)."""
    spec = importlib.util.spec_from_file_location("pymta.delivery._maildir_baseline", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--baseline: cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _body(directory: str, size: int) -> str:
    line = b"x" * 76 + b"\r\n"
    data = (b"Subject: bench\r\n\r\n" + line * (size // len(line) + 1))[:size - 2] + b"\r\n"
    path = os.path.join(directory, "body")
    with open(path, "wb") as f:
        f.write(data)
    return path


async def _deliver(module: ModuleType, mail_dir: str, body: str, count: int,
                   batch: int) -> None:
    committer = module.MaildirCommitter()
    try:
        for start in range(0, count, batch):
            items = [module.write_maildir_tmp(mail_dir, "box/", PREFIX, body, "bench")
                     for _ in range(min(batch, count - start))]
            await asyncio.gather(*(committer.commit(item) for item in items))
    finally:
        await committer.aclose()


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _run(module: ModuleType, base: str, body: str, count: int,
         batch: int) -> tuple[float, float]:
    """Seconds of wall and CPU time per delivery for one run into a new maildir.

    The maildir is kept until every run is over: ext4 skips inodes freed in the last seconds
    when it allocates new ones, so removing one run's files would slow the next run down."""
    mail_dir = tempfile.mkdtemp(prefix="mail-", dir=base)
    wall, cpu = time.perf_counter(), _cpu()
    asyncio.run(_deliver(module, mail_dir, body, count, batch))
    wall, cpu = time.perf_counter() - wall, _cpu() - cpu
    delivered = len(os.listdir(os.path.join(mail_dir, "box", "new")))
    if delivered != count or os.listdir(os.path.join(mail_dir, "box", "tmp")):
        raise SystemExit(f"{delivered} of {count} delivered, or tmp/ not empty")
    return wall / count, cpu / count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.maildir_delivery",
                                     description=__doc__.split("\n", 1)[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the maildirs are made")
    parser.add_argument("--baseline", help="an older delivery/maildir.py to compare")
    parser.add_argument("--only", action="append", help="run only this mode (repeatable)")
    args = parser.parse_args(argv)

    unnamed = current._UnnamedFiles()
    fallback = current._UnnamedFiles()
    fallback._available = False     # as on a file system that refuses O_TMPFILE
    modes: list[tuple[str, ModuleType, current._UnnamedFiles | None]] = [
        ("unnamed", current, unnamed), ("tmp/ fallback", current, fallback),
        ("unnamed, fdatasync", current, unnamed)]
    if args.baseline:
        modes.append(("before", _load_baseline(args.baseline), None))
    if args.only:
        modes = [mode for mode in modes if mode[0] in args.only]

    syncfs = current.SYNCFS
    base = tempfile.mkdtemp(prefix="pymta-maildir-bench-", dir=args.dir)
    try:
        body = _body(base, args.size)
        figures: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in modes}
        for _ in range(args.rounds):
            for name, module, choice in modes:
                if choice is not None:
                    current.UNNAMED = choice
                current.SYNCFS = None if name.endswith("fdatasync") else syncfs
                figures[name].append(_run(module, base, body, args.count, args.batch))
        fs = os.statvfs(base)
        print(f"{args.count} deliveries of {args.size} B into one maildir, batches of "
              f"{args.batch}, median of {args.rounds} rounds (under {base}, "
              f"block size {fs.f_bsize})")
        print(f"{'mode':<20} {'wall µs/msg':>12} {'CPU µs/msg':>11}")
        for name, runs in figures.items():
            wall = statistics.median(w for w, _ in runs) * 1e6
            cpu = statistics.median(c for _, c in runs) * 1e6
            print(f"{name:<20} {wall:>12.1f} {cpu:>11.1f}")
    finally:
        current.UNNAMED = current._UnnamedFiles()
        current.SYNCFS = syncfs
        shutil.rmtree(base)


if __name__ == "__main__":
    main()
