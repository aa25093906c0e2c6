"""The request header rules as one pass over the raw lines (``headers._scan_request``)
and as a plan per set of header names (``headers._Plan``, what a browser's requests take:
the same names, new values every time) give the same head, byte for byte; and a head
renewed for a request with the same plan and deciding values (``RequestHead.renewed``,
what ``prelude.Routing`` keeps preludes by) is the head worked out afresh."""

from __future__ import annotations

import pytest

from geoproxy.proxy import headers
from geoproxy.proxy.headers import RequestHead

Raw = tuple[tuple[bytes, bytes], ...]

BROWSER: Raw = (
    (b"Host", b"example.test"),
    (b"User-Agent", b"Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"),
    (b"Accept", b"text/html,*/*;q=0.8"),
    (b"Connection", b"keep-alive"),
    (b"Cookie", b"sid=1; theme=dark"),
    (b"X-Request-Id", b"0001"),
    (b"CF-IPCountry", b"FR"),
)

CASES: dict[str, Raw] = {
    "browser": BROWSER,
    "empty": (),
    "host-only": ((b"Host", b"h"),),
    "one-line-kept": ((b"Host", b"h"), (b"Accept", b"*/*")),
    "nothing-kept": ((b"Host", b"h"), (b"Via", b"1.1 a"), (b"Connection", b"keep-alive")),
    "forwarded-set": (
        (b"Host", b"h"),
        (b"X-Forwarded-For", b"203.0.113.9"),
        (b"x-forwarded-for", b"198.51.100.1"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Host", b"a.test"),
        (b"Via", b"1.0 cdn"),
        (b"Accept", b"*/*"),
    ),
    "identity-claims": (
        (b"Host", b"h"),
        (b"X-Client-Region", b"us-east"),
        (b"X-Real-IP", b"192.0.2.1"),
        (b"Forwarded", b"for=192.0.2.1"),
        (b"Accept", b"*/*"),
    ),
    "internal-and-hop-by-hop": (
        (b"Host", b"h"),
        (b"X-Geoproxy-Geode", b"forged"),
        (b"TE", b"trailers"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Proxy-Authorization", b"Basic x"),
        (b"Upgrade", b"h2c"),
        (b"Accept", b"*/*"),
    ),
    "content-length": ((b"Host", b"h"), (b"Content-Length", b"3"), (b"Accept", b"*/*")),
    "connection-names-a-header": (
        (b"Host", b"h"),
        (b"Connection", b"close, X-Secret"),
        (b"X-Secret", b"s"),
        (b"Accept", b"*/*"),
    ),
    "connection-names-host-and-length": (
        (b"Host", b"h"),
        (b"Content-Length", b"0"),
        (b"Connection", b"Host, content-length"),
    ),
}


def slow(raw: Raw, trusted: bool) -> tuple[bytes, dict[bytes, list[bytes]], int]:
    drop = headers._DROP_ALWAYS if trusted else headers._DROP_UNTRUSTED
    return headers._scan_request(raw, drop, headers._NONE)


@pytest.mark.parametrize("trusted", [True, False], ids=["trusted", "untrusted"])
@pytest.mark.parametrize("raw", list(CASES.values()), ids=list(CASES))
def test_the_plan_for_a_set_of_names_writes_what_one_pass_writes(raw: Raw, trusted: bool) -> None:
    headers._PLANS.clear()
    for _ in range(2):  # the plan built, then the plan reused
        plan = headers.plan_for(raw, trusted)
        assert plan is not None
        assert plan.apply(raw) == slow(raw, trusted)


@pytest.mark.parametrize("trusted", [True, False], ids=["trusted", "untrusted"])
def test_a_plan_reused_for_new_values_passes_the_new_values_on(trusted: bool) -> None:
    """Same names, other values (a browser's next request): the lines passed on are the
    new request's, never the first one's."""
    first = RequestHead(BROWSER, trusted)
    second_raw = tuple(
        (name, value + b"-2" if name in (b"Cookie", b"X-Request-Id", b"Host") else value)
        for name, value in BROWSER
    )
    second = RequestHead(second_raw, trusted)
    assert b"Cookie: sid=1; theme=dark-2\r\n" in second.kept
    assert b"X-Request-Id: 0001-2\r\n" in second.kept
    assert b"sid=1; theme=dark\r\n" in first.kept
    assert second.host == b"example.test-2"
    assert (second.kept, second.read, second.size) == slow(second_raw, trusted)
    assert (b"CF-IPCountry: FR\r\n" in second.kept) is trusted


def replaced(raw: Raw, name: bytes, value: bytes) -> Raw:
    return tuple((n, value if n == name else v) for n, v in raw)


def same_head(renewed: RequestHead, fresh: RequestHead) -> bool:
    return all(getattr(renewed, slot) == getattr(fresh, slot) for slot in RequestHead.__slots__)


FORWARDED = (*BROWSER, (b"X-Forwarded-For", b"203.0.113.9"), (b"X-Client-Region", b"eu-west"))


@pytest.mark.parametrize("trusted", [True, False], ids=["trusted", "untrusted"])
@pytest.mark.parametrize("name", [b"Cookie", b"X-Request-Id", b"User-Agent", b"Accept"])
def test_a_head_renewed_for_new_cookies_and_ids_is_the_head_worked_out_afresh(
    trusted: bool, name: bytes
) -> None:
    first = RequestHead(FORWARDED, trusted)
    raw = replaced(FORWARDED, name, b"new value, longer than before")
    plan = headers.plan_for(raw, trusted)
    assert plan is first.plan is not None  # the same names: the same plan
    assert plan.decide(raw) == plan.decide(FORWARDED)  # nothing deciding changed
    renewed = first.renewed(raw)
    assert same_head(renewed, RequestHead(raw, trusted))
    assert b"new value, longer than before" in renewed.kept
    assert renewed.size == first.size + len(b"new value, longer than before") - len(
        dict(FORWARDED)[name]
    )


@pytest.mark.parametrize("trusted", [True, False], ids=["trusted", "untrusted"])
@pytest.mark.parametrize(
    "name",
    [b"Host", b"Connection", b"CF-IPCountry", b"X-Client-Region", b"X-Forwarded-For"],
)
def test_a_new_value_of_a_line_that_decides_more_than_what_is_passed_on_is_seen(
    trusted: bool, name: bytes
) -> None:
    plan = headers.plan_for(FORWARDED, trusted)
    assert plan is not None
    assert plan.decide(replaced(FORWARDED, name, b"other")) != plan.decide(FORWARDED)


@pytest.mark.parametrize(
    "raw",
    [
        FORWARDED[:-1],  # a line fewer
        (*FORWARDED, (b"Via", b"1.1 cdn")),  # a line more
        (FORWARDED[1], FORWARDED[0], *FORWARDED[2:]),  # the same lines in another order
        (FORWARDED[0], (b"X-Real-IP", b"192.0.2.1"), *FORWARDED[2:]),  # renamed, same place
        replaced(FORWARDED, b"Accept", b"*/*"),  # the same names: the same plan
    ],
    ids=["fewer", "more", "order", "renamed", "same-names"],
)
def test_a_plan_stands_for_its_names(raw: Raw) -> None:
    same = [n for n, _ in raw] == [n for n, _ in FORWARDED]
    assert (headers.plan_for(raw, True) is headers.plan_for(FORWARDED, True)) is same
    assert headers.plan_for(list(FORWARDED), True) is None  # not a tuple: nothing to key on


def test_a_head_whose_connection_line_names_headers_is_never_renewed() -> None:
    raw = replaced(BROWSER, b"Connection", b"keep-alive, X-Request-Id")
    first = RequestHead(raw, True)
    assert b"X-Request-Id" not in first.kept
    assert first.plan is None
