"""The candidate book: what a node dials, when, and how much, whatever adverts say.

Pure: times are passed in, no sockets."""

from __future__ import annotations

from ringtrain.discovery.candidates import STATIC, CandidateBook


def _flood(book: CandidateBook, adverts: int = 64, addresses: int = 16, port: int = 1,
           now: float = 0.0) -> None:
    for a in range(adverts):
        book.offer([f"tcp://10.9.{a}.{i}:{port}" for i in range(addresses)], f"advert:{a}", now)


def test_a_flood_of_adverts_is_dialled_within_the_caps():
    book = CandidateBook(max_probes=32, per_source=2, probe_timeout=4.0)
    _flood(book)
    assert len(book) <= book.max_known
    first = book.due(0.0)
    assert len(first) == 32 and book.in_flight() == 32
    # one per advert first: 32 different adverts get a turn before any gets a second
    assert len({e.split(".")[2] for e in first}) == 32
    assert book.due(1.0) == []  # the cap holds until probes expire
    expired = book.expire(4.0)
    assert sorted(expired) == sorted(first)
    again = book.due(4.0)
    assert len(again) == 32 and not set(again) & set(first)  # others' turn; those back off


def test_refreshed_adverts_with_new_ports_stay_bounded():
    book = CandidateBook()
    for refresh in range(50):
        _flood(book, port=1000 + refresh, now=float(refresh))
        book.due(float(refresh))
        book.expire(float(refresh))
        assert len(book) <= book.max_known
        assert book.in_flight() <= book.max_probes


def test_expired_probes_back_off_doubling_up_to_the_cap():
    book = CandidateBook(probe_timeout=1.0, retry_first=2.0, retry_cap=8.0)
    book.offer(["tcp://10.0.0.1:7"], "advert:x", 0.0)
    now, gaps = 0.0, []
    assert book.due(now) == ["tcp://10.0.0.1:7"]
    for _ in range(4):
        now += 1.0
        assert book.expire(now) == ["tcp://10.0.0.1:7"]
        expired_at = now
        while not book.due(now):  # not dialled again before its back-off is over
            now += 0.25
        gaps.append(now - expired_at)
    assert gaps == [2.0, 4.0, 8.0, 8.0]


def test_the_users_peers_go_first_take_no_slot_and_never_expire():
    book = CandidateBook(max_probes=4)
    _flood(book, adverts=8, addresses=2)
    book.offer([f"tcp://192.168.1.{i}:7077" for i in range(40)], STATIC, 0.0)
    dialled = book.due(0.0)
    assert sum(e.startswith("tcp://192.168.1.") for e in dialled) == 40
    assert len(dialled) == 44
    assert not any(e.startswith("tcp://192.168.1.") for e in book.expire(100.0))


def test_an_answered_probe_frees_its_slot():
    book = CandidateBook(max_probes=1)
    book.offer(["tcp://10.0.0.1:7", "tcp://10.0.0.2:7"], "advert:a", 0.0)
    (first,) = book.due(0.0)
    book.answered(first)
    assert book.due(0.0) == ["tcp://10.0.0.2:7"]
