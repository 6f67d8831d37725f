"""Discovery over mDNS on 127.0.0.1 only: never multicast on the host's real interfaces.

Each test uses its own random job name, so parallel runs on the same host do not see
each other's adverts. Every wait has a deadline.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from zeroconf import ServiceInfo, Zeroconf

from ringtrain.discovery.advert import Advert
from ringtrain.discovery.interfaces import usable_ipv4_addresses
from ringtrain.discovery.mdns import (
    SERVICE_TYPE,
    Announcer,
    Browser,
    Discovery,
    parse_service_info,
)
from ringtrain.errors import ConfigError, MembershipError, TransportError

LOOPBACK = ["127.0.0.1"]
DEADLINE_S = 10.0


def make_advert(job: str, node_id: str | None = None, **changes: object) -> Advert:
    fields: dict[str, object] = dict(
        node_id=uuid.uuid4().hex[:10] if node_id is None else node_id, job=job,
        addresses=("127.0.0.1",),
        port=5555, protocol=1, key_fingerprint="ab" * 16, generation=0, state="forming",
    )
    fields.update(changes)
    return Advert(**fields)  # type: ignore[arg-type]


def poll(condition: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def job() -> str:
    return "test-" + uuid.uuid4().hex[:8]


@pytest.fixture
def discovery() -> Iterator[Discovery]:
    with Discovery(LOOPBACK) as shared:
        yield shared


# -- pure validation ---------------------------------------------------------------------


@pytest.mark.parametrize("changes", [
    {"node_id": ""}, {"node_id": "a" * 31}, {"node_id": "bad id"}, {"node_id": "-x"},
    {"job": ""}, {"job": "j" * 33}, {"job": "job\x00"}, {"job": "a.b"},
    {"addresses": ()}, {"addresses": ["127.0.0.1"]}, {"addresses": ("::1",)},
    {"addresses": ("300.1.1.1",)}, {"addresses": ("224.0.0.251",)},
    {"addresses": ("0.0.0.0",)}, {"addresses": ("10.0.0.1",) * 17},
    {"port": 0}, {"port": 65536}, {"port": True}, {"protocol": -1}, {"protocol": 70000},
    {"generation": -1}, {"generation": 2**63}, {"generation": "1"},
    {"key_fingerprint": "a b"}, {"key_fingerprint": "f" * 65},
    {"state": ""}, {"state": "Training"}, {"state": "s" * 17},
])
def test_advert_rejects_bad_fields(changes: dict[str, object]) -> None:
    fields = {"job": "job", **changes}
    with pytest.raises(ConfigError):
        make_advert(**fields)  # type: ignore[arg-type]


def test_advert_txt_uses_short_keys() -> None:
    advert = make_advert("job", node_id="n1", generation=7, state="training")
    assert advert.txt() == {"job": "job", "id": "n1", "proto": "1", "fp": "ab" * 16,
                            "gen": "7", "state": "training"}


def _info(properties: dict[str, str], addresses: list[str] | None = None) -> ServiceInfo:
    return ServiceInfo(SERVICE_TYPE, f"x.{SERVICE_TYPE}", port=5555, properties=properties,
                       parsed_addresses=addresses or ["10.0.0.5"], server="x.local.")


GOOD_TXT = {"job": "j", "id": "n1", "proto": "1", "fp": "", "gen": "3", "state": "forming"}


def test_parse_service_info_round_trip() -> None:
    advert = parse_service_info(_info(GOOD_TXT, ["10.0.0.5", "10.0.1.5"]))
    assert (advert.node_id, advert.job, advert.port, advert.generation) == ("n1", "j", 5555, 3)
    assert set(advert.addresses) == {"10.0.0.5", "10.0.1.5"}
    assert advert.instance_name == f"x.{SERVICE_TYPE}"


@pytest.mark.parametrize("bad", [
    {"gen": "-1"}, {"gen": "1e3"}, {"gen": " 1"}, {"gen": "9" * 25}, {"proto": "x"},
    {"id": "a" * 200}, {"state": "UP"}, {"fp": "has space"}, {"job": ""},
])
def test_parse_service_info_rejects_malformed(bad: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        parse_service_info(_info({**GOOD_TXT, **bad}))


def test_parse_service_info_rejects_missing_key_and_no_address() -> None:
    with pytest.raises(ConfigError, match="lacks gen"):
        parse_service_info(_info({k: v for k, v in GOOD_TXT.items() if k != "gen"}))
    with pytest.raises(ConfigError, match="addresses"):
        parse_service_info(ServiceInfo(SERVICE_TYPE, f"x.{SERVICE_TYPE}", port=1,
                                       properties=GOOD_TXT, server="x.local."))


def test_usable_ipv4_addresses() -> None:
    assert usable_ipv4_addresses("127.0.0.1") == ["127.0.0.1"]
    assert "127.0.0.1" in usable_ipv4_addresses("lo")
    every = usable_ipv4_addresses(None)
    assert every and (all(not a.startswith("127.") for a in every) or every == ["127.0.0.1"])
    with pytest.raises(ConfigError, match="no IPv4 interface"):
        usable_ipv4_addresses("no-such-interface0")


def test_bad_arguments_raise_config_error(discovery: Discovery) -> None:
    with pytest.raises(ConfigError):
        Discovery(["not-an-address"])
    with pytest.raises(ConfigError):
        Browser("bad job name", discovery=discovery)
    with pytest.raises(ConfigError, match="not both"):
        Browser(None, LOOPBACK, discovery=discovery)


# -- real mDNS on 127.0.0.1 --------------------------------------------------------------


def test_two_announcers_and_a_browser_see_each_other(job: str) -> None:
    first = make_advert(job, "node-a", port=6001, generation=2)
    second = make_advert(job, "node-b", port=6002, key_fingerprint="")
    events: list[tuple[str, str]] = []
    with Announcer(first, LOOPBACK) as a, Announcer(second, LOOPBACK) as b, \
            Browser(job, LOOPBACK, on_change=lambda e, ad: events.append((e, ad.node_id))) \
            as browser:
        found = browser.wait_for(2, job, timeout=DEADLINE_S)
        assert [ad.node_id for ad in found] == ["node-a", "node-b"]
        assert found[0] == a.advert and found[1] == b.advert
        assert found[0].instance_name == f"{job}-node-a.{SERVICE_TYPE}"
        assert found[0].addresses == ("127.0.0.1",) and found[0].port == 6001
        assert found[0].generation == 2 and found[1].key_fingerprint == ""
        assert sorted(events) == [("added", "node-a"), ("added", "node-b")]
        last = browser.last_seen("node-a")
        assert last is not None and last <= time.monotonic()
        assert browser.last_seen("nobody") is None


def test_update_reaches_browser(job: str, discovery: Discovery) -> None:
    updated = threading.Event()

    def on_change(event: str, advert: Advert) -> None:
        if event == "updated" and advert.generation == 5:
            updated.set()

    with discovery.browse(job, on_change=on_change) as browser, \
            discovery.announce(make_advert(job, "node-u")) as announcer:
        browser.wait_for(1, job, timeout=DEADLINE_S)
        new = announcer.update(generation=5, state="training")
        assert (new.generation, new.state) == (5, "training")
        assert updated.wait(DEADLINE_S)
        assert browser.adverts(job) == [new]
        with pytest.raises(ConfigError):
            announcer.update(state="NOT OK")
    with pytest.raises(TransportError, match="after close"):
        announcer.update(generation=6)


def test_goodbye_removes_advert(job: str, discovery: Discovery) -> None:
    removed = threading.Event()

    def on_change(event: str, advert: Advert) -> None:
        if event == "removed":
            removed.set()

    with discovery.browse(job, on_change=on_change) as browser:
        announcer = discovery.announce(make_advert(job, "node-g"))
        browser.wait_for(1, job, timeout=DEADLINE_S)
        announcer.close()
        assert removed.wait(DEADLINE_S)
        assert browser.adverts(job) == []


def test_browser_filters_job_and_adverts_filters_too(job: str, discovery: Discovery) -> None:
    other = job + "-other"
    with discovery.announce(make_advert(job, "mine")), \
            discovery.announce(make_advert(other, "theirs")), \
            discovery.browse(None) as everyone, discovery.browse(job) as mine:
        assert [a.node_id for a in everyone.wait_for(1, other, timeout=DEADLINE_S)] == ["theirs"]
        assert [a.node_id for a in mine.wait_for(1, job, timeout=DEADLINE_S)] == ["mine"]
        assert mine.adverts(other) == []


def test_malformed_txt_is_dropped_and_logged_once(job: str, discovery: Discovery,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="ringtrain.discovery.mdns")
    bad = ServiceInfo(SERVICE_TYPE, f"evil-{job}.{SERVICE_TYPE}", port=7000,
                      properties={**GOOD_TXT, "job": job, "id": "evil", "gen": "lots"},
                      parsed_addresses=["127.0.0.1"], server=f"evil-{job}.local.")
    hostile = Zeroconf(interfaces=LOOPBACK)
    try:
        hostile.register_service(bad, cooperating_responders=True)
        with discovery.browse(job) as browser, discovery.announce(make_advert(job, "good")):
            assert [a.node_id for a in browser.wait_for(1, job, DEADLINE_S)] == ["good"]
            poll(lambda: any(f"evil-{job}" in r.getMessage() for r in caplog.records),
                 "the warning")
            hostile.update_service(bad)  # the same bad record again: no second log line
            time.sleep(0.3)
            assert [a.node_id for a in browser.adverts()] == ["good"]
        lines = [r for r in caplog.records if f"evil-{job}" in r.getMessage()]
        assert len(lines) == 1 and "gen" in lines[0].getMessage()
    finally:
        hostile.close()


def test_wait_for_times_out_with_membership_error(job: str, discovery: Discovery) -> None:
    with discovery.browse(job) as browser, discovery.announce(make_advert(job, "lonely")):
        started = time.monotonic()
        with pytest.raises(MembershipError, match=r"found 1 of 3 nodes .*lonely@127.0.0.1"):
            browser.wait_for(3, job, timeout=1.0)
        assert time.monotonic() - started < 3.0
        with pytest.raises(ConfigError):
            browser.wait_for(1, job, timeout=0)


def test_shared_discovery_sees_its_own_advert(job: str, discovery: Discovery) -> None:
    with discovery.announce(make_advert(job, "self")), discovery.browse(job) as browser:
        assert [a.node_id for a in browser.wait_for(1, job, DEADLINE_S)] == ["self"]


def test_registration_cost_with_and_without_probing(job: str, discovery: Discovery) -> None:
    """Not a performance assertion beyond a loose bound: prints what registering costs."""
    with discovery.browse(job) as browser:
        for probe in (False, True):
            started = time.monotonic()
            with discovery.announce(make_advert(job, f"probe-{probe}".lower()), probe=probe):
                registered = time.monotonic() - started
                browser.wait_for(1, job, DEADLINE_S)
                seen = time.monotonic() - started
            print(f"probe={probe}: register {registered * 1000:.0f} ms, "
                  f"seen by a browser {seen * 1000:.0f} ms")
            assert registered < (3.0 if probe else 1.0)
            poll(lambda: not browser.adverts(job), "the goodbye")


def test_closing_discovery_first_leaves_announcer_and_browser_closable(job: str) -> None:
    discovery = Discovery(LOOPBACK)
    announcer = discovery.announce(make_advert(job))
    browser = discovery.browse(job)
    discovery.close()
    assert discovery.closed
    with pytest.raises(TransportError, match="closed"):
        announcer.update(generation=1)
    started = time.monotonic()
    announcer.close()
    browser.close()
    discovery.close()
    assert time.monotonic() - started < 2.0


CRASHING_NODE = f"""
import sys, time
from zeroconf import ServiceInfo, Zeroconf
zc = Zeroconf(interfaces={LOOPBACK!r})
name = "crash-" + sys.argv[1]
zc.register_service(ServiceInfo(
    "{SERVICE_TYPE}", name + ".{SERVICE_TYPE}", port=7001, parsed_addresses=["127.0.0.1"],
    server=name + ".local.", host_ttl=1, other_ttl=1,
    properties={{"job": sys.argv[1], "id": "crash", "proto": "1", "fp": "", "gen": "0",
                 "state": "training"}}), cooperating_responders=True)
print("ready", flush=True)
time.sleep(60)
"""


def test_advert_of_a_killed_node_expires(job: str, discovery: Discovery) -> None:
    """No goodbye: the advert goes once its SRV record's TTL (1 s here) runs out."""
    removed = threading.Event()

    def on_change(event: str, advert: Advert) -> None:
        if event == "removed" and advert.node_id == "crash":
            removed.set()

    proc = subprocess.Popen([sys.executable, "-c", CRASHING_NODE, job],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with discovery.browse(job, on_change=on_change) as browser:
            browser.wait_for(1, job, DEADLINE_S)
            proc.kill()
            proc.wait(5)
            started = time.monotonic()
            assert removed.wait(DEADLINE_S), "the killed node's advert never expired"
            print(f"expired {time.monotonic() - started:.1f} s after the kill")
            assert browser.adverts(job) == []
    except BaseException:
        proc.kill()
        out, err = proc.communicate(timeout=5)
        print(f"crashing node stdout:\n{out}\nstderr:\n{err}")
        raise


def test_live_node_is_kept_fresh_past_its_ttl(job: str, discovery: Discovery,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ringtrain.discovery.mdns.ADVERT_TTL_S", 2)
    monkeypatch.setattr("ringtrain.discovery.mdns._REANNOUNCE_S", 0.5)
    events: list[str] = []
    with discovery.browse(job, on_change=lambda e, a: events.append(e)) as browser, \
            discovery.announce(make_advert(job, "alive")):
        browser.wait_for(1, job, DEADLINE_S)
        time.sleep(4.0)  # twice the TTL: only re-announcements keep it
        assert [a.node_id for a in browser.adverts(job)] == ["alive"]
        last = browser.last_seen("alive")
        assert last is not None and time.monotonic() - last < 2.0
        assert events == ["added"]
