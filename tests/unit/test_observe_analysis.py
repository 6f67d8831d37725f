"""Who holds the ring up, from live statuses and from flight-recorder dumps (pure)."""

from __future__ import annotations

from ringtrain.observe.analysis import dump_holdup, live_holdup


def running(sequence: int, waits_from: str | None = None, waits_to: str | None = None,
            age: float = 5.0) -> dict:
    return {"name": "all_reduce", "sequence": sequence, "generation": 3, "step": 40,
            "state": "running", "age": age,
            "waiting": {"from": waits_from, "to": waits_to, "received": 1, "expected": 6}}


def test_a_silent_node_at_the_end_of_the_waits_is_named():
    nodes = {"a": {"collective": running(17, waits_from="d")},
             "b": {"collective": running(17, waits_from="a")},
             "c": None,  # stopped: it answers nothing
             "d": {"collective": running(17, waits_from="c")}}
    holdup = live_holdup(nodes)
    assert holdup is not None and holdup.node == "c"
    assert holdup.collective == "all_reduce #17 of generation 3"
    assert "does not answer" in holdup.reason
    assert holdup.sentence().startswith("node c held up all_reduce #17 of generation 3 at "
                                        "step 40: it does not answer")


def test_a_node_busy_outside_collectives_is_named():
    nodes = {"a": {"collective": running(17, waits_from="b")},
             "b": {"collective": {**running(16), "state": "done"}}}
    holdup = live_holdup(nodes)
    assert holdup is not None and holdup.node == "b"
    assert "has not started that collective" in holdup.reason


def test_nothing_is_named_while_every_node_is_idle_and_fine():
    done = {"name": "all_reduce", "sequence": 3, "generation": 1, "state": "done"}
    assert live_holdup({"a": {"collective": done}, "b": {"collective": done}}) is None


def test_after_a_failure_the_blamed_node_is_named_from_live_statuses():
    failed = {"name": "broadcast", "sequence": 5, "generation": 2, "state": "failed",
              "suspect": "c", "error": "PeerFailedError: c sent nothing for 2.0 s"}
    holdup = live_holdup({"a": {"collective": failed}, "b": {"collective": failed},
                          "c": None})
    assert holdup is not None and holdup.node == "c"
    assert "does not answer" in holdup.reason


def test_dumps_name_the_node_the_others_blamed_and_one_that_left_no_dump():
    failed = {"name": "all_reduce", "sequence": 9, "generation": 4, "state": "failed",
              "suspect": "c", "error": "PeerFailedError: c sent nothing for 2.0 s",
              "waiting": {"from": "c", "received": 2, "expected": 6}}
    older = {**failed, "sequence": 8, "state": "done", "suspect": None, "waiting": {}}
    dumps = [{"node": "a", "collectives": [older, failed]},
             {"node": "b", "collectives": [older, {**failed, "waiting": {"to": "c"}}]}]
    holdup = dump_holdup(dumps)
    assert holdup is not None and holdup.node == "c"
    assert "left no dump" in holdup.reason
    assert any("a waited for its segments" in w for w in holdup.waiting)
    assert dump_holdup([{"node": "a", "collectives": [older]}]) is None


def test_a_silent_member_outweighs_a_neighbours_first_guess():
    members = ["a", "b", "c", "d"]
    failed = {"name": "all_reduce", "sequence": 23, "generation": 1, "state": "failed",
              "members": members, "error": "PeerFailedError: d sent nothing for 3.9 s"}
    nodes = {"a": {"collective": {**failed, "suspect": "d"}},
             "b": {"collective": {**failed, "suspect": "a"}},
             "c": None,
             "d": {"collective": {**failed, "suspect": "c"}}}
    holdup = live_holdup(nodes)
    assert holdup is not None and holdup.node == "c"


def test_while_the_ring_re_forms_a_node_left_in_the_old_generation_names_the_silent_one():
    # n1 and n2 already run the new generation's first collective (waiting on nobody yet);
    # n0 is still in the old one, waiting for the stopped n3
    new = {"name": "all_gather", "sequence": 0, "generation": 4, "step": 40,
           "state": "running", "age": 0.0, "waiting": {}}
    nodes = {"n0": {"collective": running(17, waits_from="n3", age=1.9)},
             "n1": {"collective": new}, "n2": {"collective": new}, "n3": None}
    holdup = live_holdup(nodes)
    assert holdup is not None and holdup.node == "n3"
    assert holdup.collective == "all_reduce #17 of generation 3"
    assert "does not answer" in holdup.reason
