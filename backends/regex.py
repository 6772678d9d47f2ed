r"""``REGEX_ALIAS``: rewrite recipient addresses by regular expression before the lookup.

``mlan/postfix-amavis`` writes the variable into a Postfix ``regexp:`` table used as a virtual
alias map; this module keeps that table's syntax and meaning:

* rules are ``/pattern/flags replacement``, separated by newlines or spaces, e.g.
  ``REGEX_ALIAS='/([^+]+)[+-].*@(.+)/ $1@$2'`` sends ``user+info@example.com`` and
  ``user-news@example.com`` to ``user@example.com``; ``!/pattern/ replacement`` applies when
  the pattern does *not* match; lines starting with ``#`` are comments;
* matching is case-insensitive unless the ``i`` flag toggles it off (Postfix's default);
  ``m`` (``^``/``$`` at line ends), ``s`` (``.`` matches a newline) and ``x`` (blanks and
  ``#`` comments in the pattern are ignored) are as in Python; the pattern is searched, not
  anchored;
* ``$1``/``${1}`` in the replacement are the groups (an unmatched group is empty), ``$$``
  is a ``$``; a replacement may list several addresses, comma separated;
* the first matching rule wins and rewrites once.

Patterns run on RE2 (``google-re2``), whose matching time is linear in the address, so no
pattern can make one ``RCPT`` burn the CPU: with Python's backtracking ``re``,
``/^([a-z0-9]+\.?)+-list@example\.com$/`` took 1.5 s for a 24-character local part, doubling
with each character, while every other session waited (issue 10, defect 7); with RE2 it takes
microseconds. RE2 speaks the syntax of Python's ``re`` (and of POSIX ERE, which Postfix's
``regexp:`` tables are: bracket classes such as ``[[:alpha:]]`` work) except what needs
backtracking: backreferences (``\1``, ``(?P=name)``) and lookaround (``(?=``, ``(?!``,
``(?<=``, ``(?<!``), neither of which POSIX ERE has either; ``\Z`` is taken as ``\z``.
Submatches follow Python's (leftmost-first) rules, ``\w``/``\d``/``\s`` are ASCII as in
Postfix's C locale. A pattern RE2 cannot compile is a ConfigError naming ``REGEX_ALIAS`` at
start-up.

:class:`RegexRewrite` wraps the lookup chain: the rewritten address is looked up in its place
(the alias wins, as in Postfix, where virtual_alias_maps come first); when no source knows
the rewritten address the original one is tried, so an existing mailbox whose name happens to
match a rule (``mary-ann@...``) still receives mail. Rewritten addresses outside the local
domains become remote targets (forwarding). A bad pattern is a ConfigError naming
``REGEX_ALIAS`` at start-up.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import re2

from pymta.config.errors import ConfigError
from pymta.contracts import Closeable, RecipientLookup
from pymta.types import Address, Destination, Target

VAR = "REGEX_ALIAS"

_RULE_RE = re.compile(r"(!?)/((?:\\.|[^/\\])*)/([A-Za-z]*)")
_REF_RE = re.compile(r"\$(?:\{(\d+)\}|(\d+)|(\$))")


@dataclass(frozen=True, slots=True)
class RegexRule:
    pattern: Any                # a compiled RE2 pattern over UTF-8 bytes
    replacement: str
    negated: bool = False

    def apply(self, address: str) -> list[str] | None:
        """The addresses ``address`` becomes, or None when the rule does not apply."""
        try:
            data = address.encode("utf-8")
        except UnicodeEncodeError:
            # undecodable bytes (kept as surrogates): no text rule can mean this address,
            # and RE2 would match around the bytes; it is looked up as it is
            return None
        match = self.pattern.search(data)
        if self.negated:
            if match is not None:
                return None
            text = self.replacement
        else:
            if match is None:
                return None
            text = _REF_RE.sub(lambda m: _group(m, match), self.replacement)
        return [a.strip() for a in text.split(",") if a.strip()]


def _group(ref: re.Match[str], match: Any) -> str:
    if ref.group(3):
        return "$"
    value = match.group(int(ref.group(1) or ref.group(2)))
    return value.decode("utf-8", "replace") if value else ""


def parse_regex_alias(raw: str) -> tuple[RegexRule, ...]:
    """Parse the variable; raise ConfigError naming ``REGEX_ALIAS`` on any problem."""
    rules: list[RegexRule] = []
    lines = [ln for ln in raw.splitlines() if not ln.lstrip().startswith("#")]
    text = "\n".join(lines)
    pos = 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            break
        match = _RULE_RE.match(text, pos)
        if match is None:
            snippet = text[pos:pos + 40].split("\n")[0]
            raise ConfigError(f"{VAR}: expected /pattern/ replacement at {snippet!r}")
        negated, source, flags = match.group(1), match.group(2), match.group(3)
        pos = match.end()
        if pos < len(text) and not text[pos].isspace():
            raise ConfigError(f"{VAR}: unknown flags or junk after /{source}/: "
                              f"{text[match.start():pos + 10]!r}")
        while pos < len(text) and text[pos] in " \t":
            pos += 1
        end = pos
        while end < len(text) and not text[end].isspace():
            end += 1
        replacement = text[pos:end]
        pos = end
        if not replacement:
            raise ConfigError(f"{VAR}: /{source}/ has no replacement")
        rules.append(_compile(negated == "!", source, flags, replacement))
    return tuple(rules)


def _compile(negated: bool, source: str, flags: str, replacement: str) -> RegexRule:
    options = re2.Options()
    options.log_errors = False           # the ConfigError says it; RE2 must not print
    options.case_sensitive = False
    inline = ""
    verbose = False
    for flag in flags:
        if flag == "i":
            options.case_sensitive = not options.case_sensitive
        elif flag == "m":
            inline += "m"
        elif flag == "s":
            inline += "s"
        elif flag == "x":
            verbose = True
        else:
            raise ConfigError(f"{VAR}: unknown flag {flag!r} in /{source}/{flags}")
    source = source.replace("\\/", "/")
    text = _END_Z_RE.sub(r"\1\\z", _strip_verbose(source) if verbose else source)
    if inline:
        text = f"(?{inline}){text}"
    try:
        pattern = re2.compile(text, options)
    except re2.error as exc:
        why = exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(
            exc.args[0], bytes) else str(exc)
        raise ConfigError(f"{VAR}: invalid regular expression /{source}/: {why} (patterns "
                          "run on RE2: no backreferences or lookaround)") from None
    for ref in _REF_RE.finditer(replacement):
        number = ref.group(1) or ref.group(2)
        if number is not None and int(number) > pattern.groups:
            raise ConfigError(f"{VAR}: ${number} in {replacement!r} but /{source}/ has only "
                              f"{pattern.groups} group(s)")
        if negated and number is not None:
            raise ConfigError(f"{VAR}: !/{source}/ cannot use ${number} (nothing matched)")
    return RegexRule(pattern, replacement, negated)


# ``\Z`` (Python's end of text) preceded by an even number of backslashes: RE2 calls it \z
_END_Z_RE = re.compile(r"(?<!\\)((?:\\\\)*)\\Z")


def _strip_verbose(source: str) -> str:
    """Python's verbose syntax (the ``x`` flag), which RE2 lacks, made plain: blanks and
    ``#`` comments outside character classes go, escaped ones stay."""
    out: list[str] = []
    i, n = 0, len(source)
    in_class = False
    while i < n:
        c = source[i]
        if c == "\\" and i + 1 < n:
            out.append(source[i:i + 2])
            i += 2
            continue
        if in_class:
            if c == "]":
                in_class = False
        elif c == "[":
            in_class = True
            out.append(c)
            i += 1
            # a ] right after [ or [^ is a literal member, not the end of the class
            if i < n and source[i] == "^":
                out.append("^")
                i += 1
            if i < n and source[i] == "]":
                out.append("]")
                i += 1
            continue
        elif c.isspace():
            i += 1
            continue
        elif c == "#":
            while i < n and source[i] != "\n":
                i += 1
            continue
        out.append(c)
        i += 1
    return "".join(out)


def rewrite(rules: Iterable[RegexRule], address: str) -> list[str] | None:
    """What the first applicable rule makes of ``address``; None when no rule applies."""
    for rule in rules:
        result = rule.apply(address)
        if result is not None:
            return result
    return None


class RegexRewrite:
    """A RecipientLookup that rewrites by ``REGEX_ALIAS`` and asks ``inner`` (the chain)."""

    def __init__(self, rules: Iterable[RegexRule], inner: RecipientLookup,
                 local_domains: Iterable[str] | None = None) -> None:
        self.rules = tuple(rules)
        self.inner = inner
        self._domains = (frozenset(d.lower().rstrip(".") for d in local_domains)
                         if local_domains is not None else None)

    @classmethod
    def from_config(cls, config: Any, inner: RecipientLookup) -> RegexRewrite:
        """``REGEX_ALIAS`` in front of ``inner`` (the lookup chain), for ``MAIL_DOMAIN``."""
        return cls(parse_regex_alias(config.regex_alias), inner, config.mail_domain)

    @staticmethod
    def check_config(config: Any) -> None:
        """Check ``REGEX_ALIAS`` (every pattern compiles on RE2); builds nothing."""
        parse_regex_alias(config.regex_alias)

    def _is_local(self, address: str) -> bool:
        return self._domains is None or Address(address).domain.rstrip(".") in self._domains

    async def lookup(self, address: Address) -> Destination | None:
        rewritten = rewrite(self.rules, address.text)
        if not rewritten or [a.lower() for a in rewritten] == [address.key]:
            return await self.inner.lookup(address)
        targets: list[Target] = []
        seen: set[str] = set()
        for new in rewritten:
            if not self._is_local(new):
                found: tuple[Target, ...] = (Target(new, False, None),)
            else:
                dest = await self.inner.lookup(Address(new))
                found = dest.targets if dest is not None else ()
            for target in found:
                if target.address.lower() not in seen:
                    seen.add(target.address.lower())
                    targets.append(target)
        if targets:
            return Destination(tuple(targets))
        return await self.inner.lookup(address)

    async def aclose(self) -> None:
        if isinstance(self.inner, Closeable):
            await self.inner.aclose()
