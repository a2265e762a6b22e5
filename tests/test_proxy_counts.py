"""The proxy's connection counts never go backwards (condo.proxy.counts): across a HAProxy
reload or restart, a NAT table written again, and a listener moving between planes."""

from __future__ import annotations

from condo.proxy.counts import ConnectionCounts

WEB = ("web", "127.0.0.1:8080")
API = ("api", "127.0.0.1:9090")


def test_a_counter_that_starts_again_keeps_what_it_had() -> None:
    counts = ConnectionCounts()
    counts.read("nat", "l_8080", WEB, 7)
    counts.read("nat", "l_8080", WEB, 2)  # the table was deleted and written again
    assert counts.accepted(WEB) == 9
    counts.read("nat", "l_8080", WEB, 5)
    assert counts.accepted(WEB) == 12


def test_a_new_haproxy_worker_counts_from_zero_on_top() -> None:
    counts = ConnectionCounts()
    counts.read("haproxy", "f_web", WEB, 4)
    counts.read("haproxy", "f_api", API, 1)
    counts.restarted("haproxy")  # a reload: the new worker's frontends start at 0
    counts.read("haproxy", "f_web", WEB, 1)
    assert (counts.accepted(WEB), counts.accepted(API)) == (5, 1)


def test_a_listener_changing_planes_keeps_what_the_other_counted() -> None:
    counts = ConnectionCounts()
    counts.read("nat", "l_8080", WEB, 7)
    counts.read("haproxy", "l_8080", WEB, 3)  # now HAProxy's (the same name: no matter)
    assert counts.accepted(WEB) == 10
    counts.restarted("haproxy")
    assert counts.accepted(WEB) == 10  # never back
    counts.read("nat", "l_8080", WEB, 8)  # back on the NAT, whose counter went on
    assert counts.accepted(WEB) == 11


def test_a_listen_address_moving_to_another_service_counts_for_each_its_own() -> None:
    counts = ConnectionCounts()
    counts.read("nat", "l_8080", WEB, 7)
    moved = ("shop", "127.0.0.1:8080")
    counts.read("nat", "l_8080", moved, 9)  # the same counter, read for its new service
    assert counts.accepted(WEB) == 7
    assert counts.accepted(moved) == 9  # its counter's whole count: never less than before
