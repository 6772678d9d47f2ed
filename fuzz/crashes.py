"""Crash signatures, reproducer files and the keep-going guard.

A finding is identified by its *signature*: target, exception type and either the violated
property's name (for :class:`fuzz.harness.Violation`) or the innermost frame inside this
repository. The guard that wraps a target during fuzzing records each new signature once (and
replaces its reproducer when a shorter input has the same signature) and then lets the fuzzer
go on, so a long run reports every distinct bug rather than stopping at the first.

Files: ``fuzz/crashes/<target>/<signature-hash>.bin`` (the input) and ``.txt`` beside it
(signature, traceback, the input as a Python bytes literal).
"""

from __future__ import annotations

import hashlib
import traceback
from collections.abc import Callable
from pathlib import Path

from fuzz.harness import Violation

ROOT = Path(__file__).resolve().parent.parent
CRASHES = ROOT / "fuzz" / "crashes"
_OURS = (str(ROOT / "pymta"), str(ROOT / "backends"), str(ROOT / "delivery"),
         str(ROOT / "fuzz"))


def signature(target: str, exc: BaseException) -> str:
    kind = type(exc).__name__
    if isinstance(exc, Violation):
        return f"{target}:{kind}:{exc.prop}"
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if f.filename.startswith(_OURS)]
    where = (ours or frames or [None])[-1]
    if where is None:
        return f"{target}:{kind}"
    path = Path(where.filename)
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    return f"{target}:{kind}:{name}:{where.name}:{where.lineno}"


def describe(target: str, data: bytes, exc: BaseException) -> str:
    tb = "".join(traceback.format_exception(exc))
    return (f"signature: {signature(target, exc)}\n"
            f"target: {target}\n"
            f"reproduce: python -m fuzz repro {{path}}\n"
            f"input ({len(data)} bytes): {data!r}\n\n{tb}")


def record(target: str, data: bytes, exc: BaseException, folder: Path | None = None) -> Path:
    """Write (or shorten) the reproducer of ``exc``'s signature; return the .bin path."""
    folder = (folder or CRASHES) / target
    folder.mkdir(parents=True, exist_ok=True)
    sig = signature(target, exc)
    path = folder / (hashlib.sha1(sig.encode()).hexdigest()[:16] + ".bin")
    if not path.exists() or len(data) < path.stat().st_size:
        path.write_bytes(data)
        path.with_suffix(".txt").write_text(
            describe(target, data, exc).replace("{path}", str(path)), errors="replace")
    return path


def guard(target: str, fn: Callable[[bytes], None], folder: Path | None = None,
          ) -> Callable[[bytes], None]:
    """``fn`` that records exceptions instead of raising them (see the module docstring)."""
    best: dict[str, int] = {}

    def guarded(data: bytes) -> None:
        try:
            fn(data)
        except Exception as exc:  # noqa: BLE001 - recording every finding is the point
            sig = signature(target, exc)
            if sig not in best or len(data) < best[sig]:
                first = sig not in best
                best[sig] = len(data)
                path = record(target, data, exc, folder)
                if first:
                    print(f"\n=== new finding {sig}\n    reproducer: {path}", flush=True)

    return guarded


def run_one(target: str, fn: Callable[[bytes], None], data: bytes) -> BaseException | None:
    """Run ``fn`` on ``data``; the exception it raised, or None."""
    try:
        fn(data)
    except Exception as exc:  # noqa: BLE001 - whatever the target raises is the finding
        return exc
    return None


def minimize(target: str, fn: Callable[[bytes], None], data: bytes, *,
             max_runs: int = 50_000) -> bytes:
    """The shortest input found (by removing ever smaller pieces, ddmin-style) that still
    fails with the same signature as ``data``."""
    exc = run_one(target, fn, data)
    if exc is None:
        raise ValueError("the input does not fail")
    want = signature(target, exc)
    runs = 0

    def same(candidate: bytes) -> bool:
        nonlocal runs
        runs += 1
        e = run_one(target, fn, candidate)
        return e is not None and signature(target, e) == want

    size = max(1, len(data) // 2)
    while size >= 1 and runs < max_runs:
        i, shrunk = 0, False
        while i < len(data) and runs < max_runs:
            candidate = data[:i] + data[i + size:]
            if candidate != data and same(candidate):
                data, shrunk = candidate, True
            else:
                i += size
        if not shrunk:
            size //= 2
    return data
