"""``python -m fuzz``: run, reproduce and minimise fuzz findings (see ``fuzz/README.md``).

    python -m fuzz TARGET|all [--seconds N]         fuzz each target N seconds (default 10)
    python -m fuzz long [--hours H] [--slice-minutes M] [--log-dir D] [TARGET...]
    python -m fuzz repro PATH [--target T]         run a target once on a file, show the error
    python -m fuzz minimize PATH [--target T]      shrink a reproducer, keep its signature
    python -m fuzz check [TARGET...]               every target on its seed corpus (no atheris)
    python -m fuzz seeds                           rewrite fuzz/corpus/*/seed-* from fuzz/seeds.py

Exit status: 0 when nothing was found, 1 on a finding, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from fuzz.crashes import ROOT, describe, minimize, run_one, signature
from fuzz.targets import TARGETS, entry

DEFAULT_LOG_DIR = ROOT / "fuzz" / "logs"


def _names(given: list[str]) -> list[str]:
    if not given or given == ["all"]:
        return list(TARGETS)
    unknown = [n for n in given if n not in TARGETS]
    if unknown:
        raise SystemExit(f"unknown target(s) {unknown}; known: {', '.join(TARGETS)} or all")
    return given


def _target_of(path: Path, given: str | None) -> str:
    if given:
        return given
    for part in reversed(path.resolve().parts[:-1]):
        if part in TARGETS:
            return part
    raise SystemExit(f"cannot tell the target of {path}: pass --target")


def cmd_run(args: argparse.Namespace) -> int:
    from fuzz.runner import run

    return run(_names(args.targets), args.seconds, Path(args.log_dir), stop=args.stop,
               seed=args.seed)


def cmd_long(args: argparse.Namespace) -> int:
    from fuzz.runner import long_run

    return long_run(_names(args.targets), args.hours, args.slice_minutes, Path(args.log_dir))


def cmd_repro(args: argparse.Namespace) -> int:
    path = Path(args.path)
    target = _target_of(path, args.target)
    data = path.read_bytes()
    exc = run_one(target, entry(target), data)
    if exc is None:
        print(f"{target}: {path} ({len(data)} bytes) passes")
        return 0
    print(describe(target, data, exc).replace("{path}", str(path)))
    return 1


def cmd_minimize(args: argparse.Namespace) -> int:
    path = Path(args.path)
    target = _target_of(path, args.target)
    fn = entry(target)
    data = path.read_bytes()
    small = minimize(target, fn, data)
    out = path.with_suffix(".min")
    out.write_bytes(small)
    exc = run_one(target, fn, small)
    assert exc is not None
    print(f"{target}: {len(data)} -> {len(small)} bytes, written to {out}")
    print(f"signature: {signature(target, exc)}")
    print(f"input: {small!r}")
    print("".join(traceback.format_exception(exc)))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    failures = 0
    for name in _names(args.targets):
        fn = entry(name)
        files = sorted((ROOT / "fuzz" / "corpus" / name).iterdir())
        for path in files:
            exc = run_one(name, fn, path.read_bytes())
            if exc is not None:
                failures += 1
                print(f"FAIL {path.relative_to(ROOT)}: {signature(name, exc)}")
        print(f"{name}: {len(files)} corpus files")
    return 1 if failures else 0


def cmd_seeds(args: argparse.Namespace) -> int:
    from fuzz.seeds import write_all

    for name, count in write_all().items():
        print(f"{name}: {count} seeds")
    return 0


def main(argv: list[str]) -> int:
    if argv and (argv[0] in TARGETS or argv[0] == "all"):
        argv = ["run", *argv]
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run", help="fuzz targets for a budget each")
    p.add_argument("targets", nargs="*")
    p.add_argument("--seconds", type=int, default=10, help="per target")
    p.add_argument("--log-dir", default=str(DEFAULT_LOG_DIR))
    p.add_argument("--stop", action="store_true", help="stop each target at its first finding")
    p.add_argument("--seed", type=int, default=0,
                   help="libFuzzer's -seed: the same inputs in the same order on every run "
                        "(the test command's 1); 0, the default, a new seed each run")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("long", help="hours of round-robin fuzzing that survives findings")
    p.add_argument("targets", nargs="*")
    p.add_argument("--hours", type=float, default=4.0)
    p.add_argument("--slice-minutes", type=float, default=20.0)
    p.add_argument("--log-dir", default=str(DEFAULT_LOG_DIR / "long"))
    p.set_defaults(func=cmd_long)
    for name, func in (("repro", cmd_repro), ("minimize", cmd_minimize)):
        p = sub.add_parser(name)
        p.add_argument("path")
        p.add_argument("--target")
        p.set_defaults(func=func)
    p = sub.add_parser("check", help="each target on its seed corpus, without atheris")
    p.add_argument("targets", nargs="*")
    p.set_defaults(func=cmd_check)
    sub.add_parser("seeds", help="rewrite the seed corpus").set_defaults(func=cmd_seeds)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
