"""Teaching the spam engine: ``pymta learn`` and the kopano-spamd learning folders.

The image runs ``sa-learn --spam``/``--ham`` on every file kopano-spamd drops into
``KOPANO_SPAMD_LIB/spam`` and ``/ham`` ("if this directory exists"); here the files go to the
configured engine instead (spamd ``TELL``, rspamd ``/learnspam``/``/learnham``), so learning
lands in the same Bayes database the checks use, without a second SpamAssassin.

:class:`LearnFolders` polls the two folders (no inotify dependency; the folders may be a
shared volume, where inotify sees nothing anyway). The rules that make it safe:

* A file is taken only once its writer is done: its size was the same at the previous poll,
  or it was last modified more than :data:`SETTLE` seconds ago. Dotfiles are skipped (that is
  how writers and we mark work in progress), and so are symlinks (a link must not make us
  send some other file to the scanner).
* Several worker processes may poll the same folders. A file is claimed by renaming it to
  ``.learning-<pid>-<name>`` (atomic; the loser gets ``FileNotFoundError`` and moves on),
  taught, and removed. A claim left by a crash (older than :data:`STALE_CLAIM`) is taken over.
* A failure keeps the file: the claim is undone and the file is retried at a later poll,
  with a backoff that doubles up to :data:`MAX_BACKOFF`. A failure is logged when the state
  changes (the first failure, a different error), not at every poll: an engine that is down
  or refuses learning (rspamd without redis) says so once, not once per file and poll.
* A file over ``max_bytes`` (``MESSAGE_SIZE_LIMIT``) is never read: it is moved to
  ``<folder>/.too-large/`` with a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from pymta.config.errors import ConfigError

from .netio import ScannerError
from .rspamd import RspamdClient
from .spamd import SpamdClient

log = logging.getLogger("pymta.learn")

SpamClient = SpamdClient | RspamdClient

CLASSES = ("spam", "ham")
CLAIM_PREFIX = ".learning-"
TOO_LARGE = ".too-large"
SETTLE = 2.0                 # seconds since the last write after which a file is complete
STALE_CLAIM = 600.0          # a claim this old was left by a process that died
MAX_BACKOFF = 3600.0         # the longest wait between two tries of a failing file


class LearnError(ScannerError):
    """A message could not be taught: the engine refused or failed, or the file is unreadable."""


def spam_client(config: Any, timeout: float | None = None) -> SpamClient | None:
    """The client of the configured spam engine (``PYMTA_SPAMD`` or ``PYMTA_RSPAMD``), or None
    when neither is set; ``timeout`` (default ``PYMTA_SCANNER_TIMEOUT``) per exchange. A bad
    address is a ConfigError naming the variable."""
    engine = config.spam_engine
    seconds = config.scanner_timeout if timeout is None else timeout
    try:
        if engine == "spamd":
            return SpamdClient(config.spamd, timeout=seconds,
                               max_in_flight=config.scanner_concurrency)
        if engine == "rspamd":
            return RspamdClient(config.rspamd, controller=config.rspamd_controller or None,
                                password=config.rspamd_password or None, timeout=seconds,
                                max_in_flight=config.scanner_concurrency)
    except ValueError as exc:
        variable = "PYMTA_SPAMD" if engine == "spamd" else "PYMTA_RSPAMD"
        raise ConfigError(f"{variable}: {exc}") from None
    return None


def engine_name(client: SpamClient) -> str:
    """``spamd`` or ``rspamd``, as the log lines name the engine."""
    return "spamd" if isinstance(client, SpamdClient) else "rspamd"


async def learn_file(client: SpamClient, path: str | os.PathLike[str], spam: bool, *,
                     follow_symlinks: bool = True) -> None:
    """Teach the message in ``path`` as spam (or ham). Returns on success (spamd's "already
    known as that class" included); LearnError otherwise, with the engine's own reason and
    without the file name (the callers name the file). The file is opened here, so an
    unreadable file is reported as such and not as the engine's fault."""
    flags = os.O_RDONLY | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        # closed below; open_message reads from it. A dropped folder's file is never
        # followed through a symlink (swapped in after the scan): only what was dropped.
        f = os.fdopen(os.open(path, flags), "rb")
    except OSError as exc:
        raise LearnError(exc.strerror or str(exc)) from None
    with f:
        try:
            await client.learn(f, spam=spam)
        except ScannerError as exc:
            raise LearnError(str(exc), timeout=exc.timeout) from None
        except ValueError as exc:   # rspamd on a unix socket without PYMTA_RSPAMD_CONTROLLER
            raise LearnError(f"{engine_name(client)}: {exc}") from None


@dataclass
class _Failure:
    count: int
    next_try: float
    error: str


@dataclass(frozen=True)
class _Entry:
    """One regular file seen in a class folder at one poll."""

    folder: str
    name: str
    size: int
    mtime: float

    @property
    def path(self) -> str:
        return os.path.join(self.folder, self.name)


class LearnFolders:
    """Polls ``root/spam`` and ``root/ham`` every ``interval`` seconds and teaches each file
    found to ``client``; see the module docstring. ``max_bytes`` 0 means no size limit.
    Does nothing when ``root`` does not exist at :meth:`start`."""

    def __init__(self, client: SpamClient, root: str | os.PathLike[str], interval: float,
                 max_bytes: int) -> None:
        self.client = client
        self.root = os.fspath(root)
        self.interval = interval
        self.max_bytes = max_bytes
        self.engine = engine_name(client)
        self._task: asyncio.Task[None] | None = None
        self._seen: dict[str, tuple[int, float]] = {}     # path -> (size, mtime) last poll
        self._failures: dict[str, _Failure] = {}           # path -> its failure state
        self._failing: str | None = None                   # the last error logged

    @property
    def active(self) -> bool:
        return self._task is not None

    def start(self) -> None:
        """Start polling, when the root directory exists (as the image: else nothing)."""
        if self._task is not None or not os.path.isdir(self.root):
            return
        log.info("learning folders: %s/{spam,ham} taught to %s every %gs", self.root,
                 self.engine, self.interval)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="pymta-learn")

    async def aclose(self) -> None:
        """Stop polling; a file being taught is handed back to the folder, not lost."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def poll(self) -> None:
        """One pass over both folders (what the task does every ``interval`` seconds)."""
        seen: dict[str, tuple[int, float]] = {}
        for kind in CLASSES:
            folder = os.path.join(self.root, kind)
            try:
                entries = await asyncio.to_thread(_scan, folder)
            except FileNotFoundError:
                continue
            except OSError as exc:
                self._failed(folder, f"cannot read {folder}: {exc.strerror or exc}")
                continue
            for entry in entries:
                seen[entry.path] = (entry.size, entry.mtime)
                await self._consider(entry, kind == "spam", time.time())
        self._seen = seen           # forget what is gone: files taught, removed, taken
        for path in [p for p in self._failures if p not in seen]:
            del self._failures[path]

    # ------------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            try:
                await self.poll()
            except Exception:       # the fault boundary: a bug must not end learning
                log.exception("learning folders: poll of %s failed", self.root)
            await asyncio.sleep(self.interval)

    async def _consider(self, entry: _Entry, spam: bool, now: float) -> None:
        """Teach ``entry`` when it is complete and not backing off after a failure."""
        path = entry.path
        previous = self._seen.get(path)
        if entry.name.startswith(CLAIM_PREFIX):
            if now - entry.mtime < STALE_CLAIM:
                return                          # another process is teaching it right now
            original = os.path.join(entry.folder, _unclaimed(entry.name))
        else:
            if previous != (entry.size, entry.mtime) and now - entry.mtime < SETTLE:
                return                          # still being written
            original = path
        failure = self._failures.get(original)
        if failure is not None and now < failure.next_try:
            return
        if self.max_bytes and entry.size > self.max_bytes:
            self._set_aside(entry, original)
            return
        await self._teach(entry, original, spam)

    async def _teach(self, entry: _Entry, original: str, spam: bool) -> None:
        claimed = os.path.join(entry.folder, f"{CLAIM_PREFIX}{os.getpid()}-"
                                             f"{os.path.basename(original)}")
        try:
            os.rename(entry.path, claimed)
            os.utime(claimed)                   # the claim's age, for the stale-claim rule
        except FileNotFoundError:
            return                              # another process took it first
        except OSError as exc:
            self._failed(original, f"cannot claim {entry.path}: {exc.strerror or exc}")
            return
        done = False
        try:
            await learn_file(self.client, claimed, spam, follow_symlinks=False)
            done = True
        except LearnError as exc:
            self._failed(original, str(exc))
        finally:
            if not done:                        # failed or cancelled: hand the file back
                _release(claimed, original, entry.mtime)
        if done:
            self._learned(claimed, original, spam)

    def _learned(self, claimed: str, original: str, spam: bool) -> None:
        self._failures.pop(original, None)
        if self._failing is not None:
            log.info("learning folders: %s learning works again", self.engine)
            self._failing = None
        log.info("learned %s from %s (%s)", "spam" if spam else "ham", original, self.engine)
        try:
            os.unlink(claimed)
        except OSError as exc:
            log.warning("learned %s, but cannot remove it: %s", claimed, exc.strerror or exc)

    def _failed(self, original: str, error: str) -> None:
        """Note a failure and back off; log it only when the state changes."""
        old = self._failures.get(original)
        count = old.count + 1 if old else 1
        delay = min(self.interval * 2 ** (count - 1), MAX_BACKOFF)
        self._failures[original] = _Failure(count, time.time() + delay, error)
        if error in (self._failing, old.error if old else None):
            log.debug("learning %s: still failing (%d): %s", original, count, error)
            return
        self._failing = error
        log.warning("cannot learn %s (%s): %s; the file is kept and retried", original,
                    self.engine, error)

    def _set_aside(self, entry: _Entry, original: str) -> None:
        aside = os.path.join(entry.folder, TOO_LARGE)
        target = os.path.join(aside, os.path.basename(original))
        try:
            os.makedirs(aside, exist_ok=True)
            os.rename(entry.path, target)
        except FileNotFoundError:
            return                              # another process moved or claimed it
        except OSError as exc:
            self._failed(original, f"cannot move {entry.path} aside: {exc.strerror or exc}")
            return
        log.warning("not learning %s: %d bytes, over the size limit of %d; moved to %s",
                    original, entry.size, self.max_bytes, target)


# ---------------------------------------------------------------------------------------------

def _scan(folder: str) -> list[_Entry]:
    """The regular files of ``folder`` worth looking at: not symlinks, not dotfiles except
    claims (which may be a dead process's leftovers)."""
    out = []
    with os.scandir(folder) as it:
        for d in it:
            if d.name.startswith(".") and not d.name.startswith(CLAIM_PREFIX):
                continue
            try:
                if not d.is_file(follow_symlinks=False):
                    continue
                st = d.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            out.append(_Entry(folder, d.name, st.st_size, st.st_mtime))
    return sorted(out, key=lambda e: (e.mtime, e.name))


def _unclaimed(name: str) -> str:
    """``.learning-123-msg.eml`` -> ``msg.eml``."""
    rest = name[len(CLAIM_PREFIX):]
    pid, sep, original = rest.partition("-")
    return original if sep and pid.isdigit() and original else name


def _release(claimed: str, original: str, mtime: float) -> None:
    """Give a claimed file back under its own name and modification time."""
    try:
        os.utime(claimed, (mtime, mtime))
        os.rename(claimed, original)
    except OSError as exc:
        log.warning("cannot hand %s back as %s: %s", claimed, original, exc.strerror or exc)
