"""The log handler batches a loop iteration's lines and writes them off the loop, in order."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import threading
import time
from collections.abc import Iterator

import pytest

from proxy.log import (
    REQUEST_ID,
    JSONFormatter,
    LoopBatchingHandler,
    RefusalLimiter,
    RequestLog,
    flush_logs,
    new_request_id,
)


class _CountingStream(io.StringIO):
    """Counts ``write`` calls (one per batch is the point of the handler) and
    notes which threads wrote or flushed: never the event loop's.
    """

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.threads: set[str] = set()

    def write(self, s: str) -> int:
        self.writes += 1
        self.threads.add(threading.current_thread().name)
        return super().write(s)

    def flush(self) -> None:
        self.threads.add(threading.current_thread().name)
        super().flush()


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, _CountingStream, LoopBatchingHandler]]:
    stream = _CountingStream()
    handler = LoopBatchingHandler(stream)
    handler.setFormatter(JSONFormatter())
    logger = logging.getLogger("test.batching")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield logger, stream, handler
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
        handler.close()


def _events(stream: io.StringIO) -> list[str]:
    return [json.loads(line)["event"] for line in stream.getvalue().splitlines()]


def _wait_for(stream: io.StringIO, count: int, timeout: float = 5.0) -> list[str]:
    """The events once ``count`` lines are written, blocking whatever loop runs."""
    deadline = time.monotonic() + timeout
    while len(events := _events(stream)) < count and time.monotonic() < deadline:
        time.sleep(0.001)
    return events


async def test_one_write_per_loop_iteration_and_never_on_the_loop(
    logged: tuple[logging.Logger, _CountingStream, LoopBatchingHandler],
) -> None:
    logger, stream, handler = logged
    for i in range(50):
        logger.info("line %d", i)
    assert _wait_for(stream, 1, timeout=0.1) == []  # queued, not handed over yet
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    handler.flush()
    assert _events(stream) == [f"line {i}" for i in range(50)]
    assert stream.writes == 1
    assert stream.threads == {"kube-oidc-gate-log-writer"}


async def test_lines_of_separate_iterations_are_not_held_back(
    logged: tuple[logging.Logger, _CountingStream, LoopBatchingHandler],
) -> None:
    logger, stream, _ = logged
    for i in range(3):
        logger.info("tick %d", i)
        for _ in range(500):  # bounded: 5 s at most, and no flush to help
            if _events(stream)[-1:] == [f"tick {i}"]:
                break
            await asyncio.sleep(0.01)
        assert _events(stream) == [f"tick {n}" for n in range(i + 1)]


async def test_a_warning_is_handed_over_at_once_after_what_is_queued(
    logged: tuple[logging.Logger, _CountingStream, LoopBatchingHandler],
) -> None:
    logger, stream, handler = logged
    logger.info("first")
    logger.warning("second")
    # The loop is blocked here, so this iteration has not ended: the warning
    # (and the line queued before it) went to the writer at once.
    assert _wait_for(stream, 2) == ["first", "second"]
    logger.info("third")
    logger.error("fourth")
    logger.info("fifth")
    await asyncio.sleep(0)
    handler.flush()
    assert _events(stream) == ["first", "second", "third", "fourth", "fifth"]


async def test_order_is_kept_across_levels_and_threads(
    logged: tuple[logging.Logger, _CountingStream, LoopBatchingHandler],
) -> None:
    logger, stream, handler = logged
    logger.info("a: loop")
    thread = threading.Thread(target=logger.info, args=("b: thread",))
    thread.start()
    thread.join(timeout=5)
    logger.info("c: loop")
    logger.warning("d: loop warning")
    logger.info("e: loop")
    await asyncio.sleep(0)
    handler.flush()
    assert _events(stream) == [
        "a: loop",
        "b: thread",
        "c: loop",
        "d: loop warning",
        "e: loop",
    ]
    assert "MainThread" not in stream.threads


def test_without_a_running_loop_lines_are_handed_over_at_once(
    logged: tuple[logging.Logger, _CountingStream, LoopBatchingHandler],
) -> None:
    logger, stream, handler = logged
    logger.info("outside any loop")
    assert _wait_for(stream, 1) == ["outside any loop"]
    thread = threading.Thread(target=logger.info, args=("from a thread",))
    thread.start()
    thread.join(timeout=5)
    handler.flush()
    assert _events(stream) == ["outside any loop", "from a thread"]


async def test_flush_logs_writes_the_queue_now(
    logged: tuple[logging.Logger, _CountingStream, LoopBatchingHandler],
) -> None:
    logger, stream, handler = logged
    logger.info("before exit")
    flush_logs()  # what a forked worker does before os._exit
    assert _events(stream) == ["before exit"]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    handler.flush()
    assert _events(stream) == ["before exit"]  # and never twice


def _child_report(write: int, stream: io.StringIO) -> None:  # pragma: no cover
    os.write(write, json.dumps(_events(stream)).encode())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
async def test_a_forked_child_does_not_repeat_its_parents_queue(
    logged: tuple[logging.Logger, _CountingStream, LoopBatchingHandler],
) -> None:
    logger, stream, handler = logged
    logger.info("queued in the parent")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(read)
        logger.info("logged in the child")
        flush_logs()  # the child's own writer thread writes it
        _child_report(write, stream)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        seen_by_child = json.loads(pipe.read())  # bounded: the child exits at once
    os.waitpid(pid, 0)  # noqa: ASYNC222 - the child has already written and exits at once
    # The parent wrote its queue before the fork, so the child's copy of the
    # stream holds the line once and the child's queue was empty.
    assert seen_by_child == ["queued in the parent", "logged in the child"]
    handler.flush()
    assert _events(stream) == ["queued in the parent"]


class _StuckStream(io.StringIO):
    """A stream whose writes block (in the process that made it) until let go."""

    def __init__(self) -> None:
        super().__init__()
        self.owner = os.getpid()
        self.gate = threading.Event()
        self.entered = threading.Event()

    def write(self, s: str) -> int:
        if os.getpid() == self.owner:
            self.entered.set()
            self.gate.wait(10)
        return super().write(s)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
async def test_a_fork_while_the_writer_is_stuck_leaves_the_parents_lines_to_it() -> (
    None
):
    stream = _StuckStream()
    handler = LoopBatchingHandler(stream, flush_timeout=0.2)
    handler.setFormatter(JSONFormatter())
    logger = logging.getLogger("test.stuck")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logger.info("a")
        await asyncio.sleep(0)
        assert stream.entered.wait(5), "the writer is in write() and stays there"
        logger.info("b")  # waits behind "a" when the fork comes
        await asyncio.sleep(0)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            os.close(read)
            logger.info("c")
            flush_logs()
            _child_report(write, stream)
            os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            seen_by_child = json.loads(pipe.read())
        os.waitpid(pid, 0)  # noqa: ASYNC222 - the child has already written and exits at once
        assert seen_by_child == ["c"], "nothing of the parent's written twice"
        stream.gate.set()
        handler.flush()
        assert _events(stream) == ["a", "b"]
    finally:
        stream.gate.set()
        logger.removeHandler(handler)
        handler.close()


async def test_a_broken_stream_never_raises_into_the_caller(
    logged: tuple[logging.Logger, _CountingStream, LoopBatchingHandler],
    capsys: pytest.CaptureFixture[str],
) -> None:
    logger, stream, handler = logged
    stream.close()
    logger.info("lost")
    logger.error("lost too")
    await asyncio.sleep(0)
    handler.flush()
    assert "log lines could not be written" in capsys.readouterr().err


async def test_past_the_backlog_limit_lines_are_dropped_counted_and_reported() -> None:
    stream = _StuckStream()
    handler = LoopBatchingHandler(stream, backlog_limit=2000)
    handler.setFormatter(JSONFormatter())
    logger = logging.getLogger("test.dropping")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        for i in range(100):  # about 100 characters a line
            logger.info("line %03d", i)
            await asyncio.sleep(0)
        logger.warning("dropped too")
        assert handler._dropped > 0, "counted while the writer is stuck"
        stream.gate.set()
        handler.flush()
        logger.info("after")
        handler.flush()
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        stream.gate.set()
        logger.removeHandler(handler)
        handler.close()
    *kept, notice, after = lines
    assert 0 < len(kept) < 100
    assert [x["event"] for x in kept] == [f"line {i:03d}" for i in range(len(kept))]
    assert sum(len(json.dumps(x, separators=(",", ":"))) + 1 for x in kept) <= 2000
    assert (notice["event"], notice["level"], notice["dropped"]) == (
        "log lines dropped",
        "warning",
        101 - len(kept),
    )
    assert notice["backlog_limit"] == 2000
    assert after["event"] == "after", "and lines flow again once caught up"


def test_request_ids_are_16_hex_digits_and_unique() -> None:
    ids = [new_request_id() for _ in range(10_000)]
    assert all(len(i) == 16 and int(i, 16) >= 0 for i in ids)
    assert len(set(ids)) == len(ids)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_worker_has_its_own_pid_and_request_ids() -> None:
    parent_ids = {new_request_id() for _ in range(3)}
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(read)
        record = logging.LogRecord("x", logging.INFO, "", 0, "child", None, None)
        line = JSONFormatter().format(record)
        os.write(write, json.dumps([line, new_request_id()]).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        line, child_id = json.loads(pipe.read())
    os.waitpid(pid, 0)
    assert json.loads(line)["pid"] == pid
    assert child_id not in parent_ids
    assert child_id[:8] != next(iter(parent_ids))[:8], "a fresh per-process prefix"


@pytest.fixture
def as_configured() -> Iterator[_CountingStream]:
    """Root logging exactly as ``configure_logging`` leaves it, into a buffer."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = _CountingStream()
    handler = LoopBatchingHandler(stream)
    handler.setFormatter(JSONFormatter())
    root.handlers = [handler]
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.handlers = saved[0]
        root.setLevel(saved[1])
        handler.close()


def _without_time(line: str) -> dict[str, object]:
    out = json.loads(line)
    assert out.pop("time").endswith("Z")
    return dict(out)


async def test_request_log_renders_the_same_line_as_the_logging_path(
    as_configured: _CountingStream,
) -> None:
    fields = {"result": "ok", "latency_ms": 0.5, "groups": 2, "odd": object()}
    token = REQUEST_ID.set("rid-1")
    try:
        RequestLog("proxy.webhook").info("token review", fields)
        logging.getLogger("proxy.webhook").info("token review", extra=fields)
    finally:
        REQUEST_ID.reset(token)
    await asyncio.sleep(0)
    flush_logs()
    direct, classic = as_configured.getvalue().splitlines()
    assert _without_time(direct) == _without_time(classic)
    assert list(json.loads(direct)) == list(json.loads(classic)), "same member order"
    assert json.loads(direct)["request_id"] == "rid-1"


async def test_request_log_goes_through_logging_when_something_else_listens(
    as_configured: _CountingStream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)  # a second handler on the root: caplog's
    RequestLog("proxy.access").info("request", {"status": 200})
    assert [(r.name, r.getMessage(), r.__dict__["status"]) for r in caplog.records] == [
        ("proxy.access", "request", 200)
    ]


async def test_request_log_respects_levels_and_filters(
    as_configured: _CountingStream,
) -> None:
    logger = logging.getLogger("proxy.access")
    logger.setLevel(logging.WARNING)
    try:
        RequestLog("proxy.access").info("request", {"status": 200})
    finally:
        logger.setLevel(logging.NOTSET)
    dropped: list[str] = []

    def drop(record: logging.LogRecord) -> bool:
        dropped.append(record.getMessage())
        return False

    logger.addFilter(drop)
    try:
        RequestLog("proxy.access").info("filtered", {"status": 200})
    finally:
        logger.removeFilter(drop)
    await asyncio.sleep(0)
    flush_logs()
    assert as_configured.getvalue() == ""
    assert dropped == ["filtered"]


# -- the refusal limiter --------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class _Lines:
    """A RequestLog stand-in that keeps what it is given."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, object]]] = []

    def info(self, event: str, fields: dict[str, object]) -> None:
        self.lines.append((event, fields))


def _limiter(lines: _Lines, clock: _Clock, **kw: int) -> RefusalLimiter:
    return RefusalLimiter(lines, clock=clock, period=1.0, **kw)


EXPIRED = (("status", 401), ("cause", "token_expired"))
BADSIG = (("status", 401), ("cause", "signature_invalid"))


def test_the_first_refusals_of_a_cause_are_logged_then_counted() -> None:
    lines, clock = _Lines(), _Clock()
    limiter = _limiter(lines, clock, limit=3)
    admitted = [limiter.admit(EXPIRED) for _ in range(10)]
    assert admitted == [True] * 3 + [False] * 7
    # Another cause has its own allowance.
    assert [limiter.admit(BADSIG) for _ in range(4)] == [True] * 3 + [False]
    assert lines.lines == [], "nothing is said about them before the period ends"
    clock.now += 1.0
    assert limiter.admit(EXPIRED), "a new period starts afresh"
    assert lines.lines == [
        (
            "refusals not logged",
            {"status": 401, "cause": "token_expired", "not_logged": 7, "period_s": 1.0},
        ),
        (
            "refusals not logged",
            {
                "status": 401,
                "cause": "signature_invalid",
                "not_logged": 1,
                "period_s": 1.0,
            },
        ),
    ]


def test_a_cause_within_its_limit_gets_no_summary_line() -> None:
    lines, clock = _Lines(), _Clock()
    limiter = _limiter(lines, clock, limit=3)
    for _ in range(3):
        assert limiter.admit(EXPIRED)
    clock.now += 5
    limiter.flush()
    assert lines.lines == []


def test_limit_zero_logs_every_refusal() -> None:
    lines, clock = _Lines(), _Clock()
    limiter = _limiter(lines, clock, limit=0)
    assert all(limiter.admit(EXPIRED) for _ in range(1000))
    limiter.flush()
    assert lines.lines == []


def test_causes_past_the_table_size_are_logged_in_full() -> None:
    """A flood of distinct causes cannot push a new one out of the log."""
    lines, clock = _Lines(), _Clock()
    limiter = _limiter(lines, clock, limit=1, max_causes=4)
    for n in range(4):
        assert limiter.admit((("cause", f"c{n}"),))
    # The table is full: an unseen cause is logged every time, not counted.
    assert all(limiter.admit((("cause", "late"),)) for _ in range(5))
    # Those in the table are still limited.
    assert not limiter.admit((("cause", "c0"),))


async def test_the_count_is_reported_when_the_period_ends_without_more_refusals() -> (
    None
):
    lines = _Lines()
    limiter = RefusalLimiter(lines, limit=1, period=0.05)
    assert limiter.admit(EXPIRED)
    assert not limiter.admit(EXPIRED)
    assert not limiter.admit(EXPIRED)
    await asyncio.sleep(0.02)
    assert lines.lines == []
    for _ in range(100):  # bounded: 2 s at most
        if lines.lines:
            break
        await asyncio.sleep(0.02)
    assert lines.lines == [
        (
            "refusals not logged",
            {
                "status": 401,
                "cause": "token_expired",
                "not_logged": 2,
                "period_s": 0.05,
            },
        )
    ]
    assert limiter.admit(EXPIRED), "and the next period starts afresh"


def test_flush_logs_reports_what_was_left_out() -> None:
    lines, clock = _Lines(), _Clock()
    limiter = _limiter(lines, clock, limit=1)
    for _ in range(3):
        limiter.admit(EXPIRED)
    flush_logs()
    assert lines.lines == [
        (
            "refusals not logged",
            {"status": 401, "cause": "token_expired", "not_logged": 2, "period_s": 1.0},
        )
    ]
    flush_logs()
    assert len(lines.lines) == 1, "reported once"


def test_a_summary_logged_during_a_request_does_not_carry_its_id() -> None:
    seen: list[str] = []

    class _Ids(_Lines):
        def info(self, event: str, fields: dict[str, object]) -> None:
            seen.append(REQUEST_ID.get())

    lines, clock = _Ids(), _Clock()
    limiter = _limiter(lines, clock, limit=1)
    limiter.admit(EXPIRED)
    limiter.admit(EXPIRED)
    clock.now += 1
    token = REQUEST_ID.set("rid-of-a-later-request")
    try:
        limiter.admit(EXPIRED)  # the period rolls over inside this request
        assert REQUEST_ID.get() == "rid-of-a-later-request"
    finally:
        REQUEST_ID.reset(token)
    assert seen == [""]
