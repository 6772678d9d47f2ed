"""Fuzz target: MAIL FROM / RCPT TO argument parsing (``pymta.smtp.params``).

Input layout: one flag byte (SMTPUTF8 for the address, which keyword, a small SIZE limit),
then the argument text as the engine decodes it (UTF-8 with surrogateescape).

Contract checked: ``split_path`` returns None or two strings; ``parse_address`` returns None
or an address that is safe downstream (``check_address``) and parses again to itself;
``parse_mail_params`` / ``parse_rcpt_params`` return well-typed values or raise
``ParamError`` -- never anything else -- and a ParamError's reply is a well-formed reply
line; accepted ENVID, AUTH and ORCPT values are RFC 3461 xtext (ORCPT's addr-type an atom);
``xtext_decode`` never raises.
"""

from __future__ import annotations

from fuzz.harness import Input, check_address, check_reply, is_atom, is_xtext, require
from pymta.smtp.params import (
    MailParams,
    ParamError,
    RcptParams,
    parse_address,
    parse_mail_params,
    parse_rcpt_params,
    split_path,
    xtext_decode,
)


def _address(path: str, utf8: bool, allow_null: bool, postmaster: bool) -> None:
    addr = parse_address(path, utf8=utf8, allow_null=allow_null,
                         allow_bare_postmaster=postmaster)
    if addr is None:
        return
    if addr == "":
        require(allow_null, "null path accepted where it is not allowed", path)
        return
    check_address(addr, utf8=utf8, what="parse_address")
    again = parse_address(f"<{addr}>", utf8=utf8, allow_null=allow_null,
                          allow_bare_postmaster=postmaster)
    require(again == addr, "accepted address does not parse again to itself", (addr, again))


def _mail_params(text: str, size_limit: int) -> None:
    try:
        params = parse_mail_params(text, size_limit=size_limit)
    except ParamError as exc:
        require(exc.reply.code >= 500, "ParamError reply is not permanent", exc.reply)
        check_reply(exc.reply, "ParamError")
        return
    require(isinstance(params, MailParams), "parse_mail_params returned no MailParams")
    if params.size is not None:
        require(params.size >= 0 and (not size_limit or params.size <= size_limit),
                "SIZE outside the limit accepted", params.size)
    require(params.body in ("7BIT", "8BITMIME"), "bad BODY accepted", params.body)
    require(params.ret in (None, "FULL", "HDRS"), "bad RET accepted", params.ret)
    if params.envid is not None:
        require(is_xtext(params.envid) and len(params.envid) <= 500, "ENVID is not xtext",
                params.envid)
    if params.auth is not None:
        require(params.auth == "<>" or is_xtext(params.auth), "AUTH= value is not xtext",
                params.auth)


def _rcpt_params(text: str) -> None:
    try:
        params = parse_rcpt_params(text)
    except ParamError as exc:
        require(exc.reply.code >= 500, "ParamError reply is not permanent", exc.reply)
        check_reply(exc.reply, "ParamError")
        return
    require(isinstance(params, RcptParams), "parse_rcpt_params returned no RcptParams")
    if params.notify is not None:
        words = params.notify.split(",")
        require(words == ["NEVER"] or (
            set(words) <= {"SUCCESS", "FAILURE", "DELAY"} and len(set(words)) == len(words)),
            "bad NOTIFY accepted", params.notify)
    if params.orcpt is not None:
        kind, semi, addr = params.orcpt.partition(";")
        require(semi and is_atom(kind), "ORCPT addr-type is not an atom", params.orcpt)
        require(addr and is_xtext(addr), "ORCPT address is not xtext", params.orcpt)


def test_one_input(data: bytes) -> None:
    inp = Input(data)
    flags = inp.byte()
    utf8 = bool(flags & 1)
    keyword = "FROM:" if flags & 2 else "TO:"
    size_limit = (inp.byte() * 97) if flags & 4 else 10240000
    arg = inp.rest().decode("utf-8", "surrogateescape")

    parts = split_path(arg, keyword)
    if parts is not None:
        require(isinstance(parts, tuple) and len(parts) == 2
                and all(isinstance(p, str) for p in parts), "split_path: bad result", parts)
        path, ptext = parts
    else:
        path, ptext = arg, arg
    for allow_null, postmaster in ((True, False), (False, True)):
        _address(path, utf8, allow_null, postmaster)
    _mail_params(ptext, size_limit)
    _rcpt_params(ptext)
    require(isinstance(xtext_decode(ptext), str), "xtext_decode returned no str")
