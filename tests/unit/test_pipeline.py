"""The pipeline runner: ordering of verdicts, timeouts and faults as temporary results."""

from __future__ import annotations

import asyncio

from pymta.pipeline import Action, CannotEvaluate, Pipeline, SpooledBody, Transaction, Verdict
from pymta.types import Reply


def txn() -> Transaction:
    return Transaction(qid="Q1", sender="a@b.test", recipients=[], peer_ip="192.0.2.1",
                       helo="b.test", hostname="mx.test", local_domains=frozenset({"mx.test"}))


class Fixed:
    def __init__(self, name: str, verdict: Verdict, delay: float = 0.0) -> None:
        self.name, self.verdict, self.delay = name, verdict, delay

    async def check(self, txn: Transaction, body: SpooledBody) -> Verdict:
        await asyncio.sleep(self.delay)
        return self.verdict


class Boom:
    name = "boom"

    async def check(self, txn: Transaction, body: SpooledBody) -> Verdict:
        raise RuntimeError("backend exploded")


class AddHeader:
    def __init__(self, name: str, line: str) -> None:
        self.name, self.line = name, line

    async def modify(self, txn: Transaction, body: SpooledBody) -> None:
        txn.add_header(self.line)


async def run(pipeline: Pipeline, t: Transaction | None = None):
    t = t or txn()
    return t, await pipeline.run(t, SpooledBody("/nonexistent", 0))


async def test_strongest_verdict_wins_and_results_are_recorded():
    reject = Verdict(Action.REJECT, Reply(550, "5.7.1", "no"), auth_result="spf=fail")
    t, out = await run(Pipeline([Fixed("a", Verdict(Action.QUARANTINE)), Fixed("spf", reject),
                                 Fixed("c", Verdict(auth_result="dkim=pass"))]))
    assert out.action is Action.REJECT and out.reply.code == 550
    assert t.auth_results == ["spf=fail", "dkim=pass"]
    assert t.results["spf"] is reject


async def test_timeout_is_a_temporary_failure_never_a_pass():
    t, out = await run(Pipeline([Fixed("slow", Verdict(), delay=5)], timeout=0.05))
    assert out.action is Action.TEMPFAIL
    assert out.reply.code == 451 and out.reply.enhanced == "4.7.0"


async def test_a_failing_check_is_temporary():
    _, out = await run(Pipeline([Boom()]))
    assert out.action is Action.TEMPFAIL and out.reply.code == 451


async def test_modifiers_stack_headers_newest_first_and_skip_on_reject():
    t, out = await run(Pipeline([], [AddHeader("one", "X-One: 1"), AddHeader("two", "X-Two: 2")]))
    assert out.action is Action.PASS
    assert t.prepend == ["X-Two: 2\r\n", "X-One: 1\r\n"]
    rejecting = Pipeline([Fixed("r", Verdict(Action.REJECT, Reply(554, "5.7.1", "x")))],
                         [AddHeader("one", "X-One: 1")])
    t, _ = await run(rejecting)
    assert t.prepend == []


class Unparseable:
    """A stage whose library cannot parse the message (issue 10, defect 9)."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def check(self, txn: Transaction, body: SpooledBody) -> Verdict:
        raise CannotEvaluate("header section does not parse")

    async def modify(self, txn: Transaction, body: SpooledBody) -> None:
        raise CannotEvaluate("header section does not parse")


async def test_issue10_defect9_a_stage_that_cannot_parse_is_no_opinion_never_a_tempfail():
    spf = Fixed("spf", Verdict(auth_result="spf=pass"))
    t, out = await run(Pipeline([Unparseable("dkim"), spf],
                                [Unparseable("arc-seal"), AddHeader("ar", "X-After: 1")]))
    assert out.action is Action.PASS and out.reply is None
    assert t.auth_results == ["spf=pass"]
    assert t.prepend == ["X-After: 1\r\n"]        # the modifiers after it still ran
    assert any("does not parse" in r for r in out.reasons)
    # a fault of ours stays temporary
    _, out = await run(Pipeline([Boom(), Unparseable("dkim")]))
    assert out.action is Action.TEMPFAIL


async def test_stages_read_a_body_still_in_memory_without_writing_the_file(tmp_path):
    """Issue 14: a small message stays in the spool's memory; a stage reading it whole (DKIM,
    ARC) gets it from there and the file is written only for a stage that needs the file."""
    data = b"Subject: s\r\nX-Drop: me\r\n\r\nbody\r\n"
    path = tmp_path / "spool"
    path.write_bytes(b"")
    flushed: list[bool] = []

    def flush() -> None:
        flushed.append(True)
        path.write_bytes(data)

    body = SpooledBody(str(path), len(data), None, flush, lambda: data)
    assert body.header_bytes() == b"Subject: s\r\nX-Drop: me\r\n"
    assert await body.read_async() == data
    assert flushed == [] and path.read_bytes() == b""
    body.drop_headers([lambda field: field.startswith(b"X-Drop:")])
    assert body.read() == b"Subject: s\r\n\r\nbody\r\n"
    assert body.on_disk() == str(path) and path.read_bytes() == data   # the scanners' file
    assert flushed == [True]
