"""One libFuzzer process for one target: ``python -m fuzz.worker TARGET [--stop] [libFuzzer
flags and corpus directories]``.

The runner (``python -m fuzz``) starts this in a child process, so a crash that kills the
interpreter (libFuzzer's timeout, out-of-memory) ends only that target. pymta's modules are
imported inside ``atheris.instrument_imports`` here and nowhere before, which is what gives
libFuzzer coverage feedback from them. Without ``--stop`` every finding is recorded by
:func:`fuzz.crashes.guard` and fuzzing goes on; with it the first exception ends the run the
libFuzzer way (its ``crash-*`` artifact, non-zero exit).
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> None:
    import atheris

    from fuzz import crashes, targets

    name, args = argv[0], argv[1:]
    stop = "--stop" in args
    args = [a for a in args if a != "--stop"]
    with atheris.instrument_imports(include=["pymta", "fuzz.targets"]):
        fn = targets.entry(name)
    atheris.Setup([sys.argv[0], *args], fn if stop else crashes.guard(name, fn))
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv[1:])
