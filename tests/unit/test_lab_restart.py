"""What ``ringtrain lab-restart`` reads from the nodes' output, checked against the lines the
product prints (no namespaces: the command itself needs root and minutes)."""

from __future__ import annotations

from ringtrain.lab.restart import _END, _IN_RING, _VIEW
from ringtrain.membership.protocol import View
from ringtrain.observe.recorder import FlightRecorder


def _messages(recorder: FlightRecorder) -> list[str]:
    seen: list[str] = []
    recorder.subscribe(lambda kind, data: seen.append(data["message"])
                       if kind == "event" else None)
    return seen


def test_the_ring_lines_of_a_merge_say_two_rings_met_and_parse():
    recorder = FlightRecorder("c")
    seen = _messages(recorder)
    recorder.view_installed(View(1, ("c", "d"), 0, "L2"))
    recorder.view_installed(View(2, ("a", "b", "c", "d"), 2, "L1", met=("a", "b")))
    recorder.view_installed(View(3, ("a", "b", "c", "d"), 2, "L1"))
    assert seen[0].startswith("ring formed: 2 members, generation 1")
    assert "two rings of this job met and merged, from the other ring: a, b" in seen[1]
    assert "two rings" not in seen[2]
    assert [_VIEW.search(m).groups() for m in seen] == [("2", "1"), ("4", "2"), ("4", "3")]


def test_the_end_and_in_ring_lines_parse():
    end = _END.search("ringtrain node vm-abc: done at step 2760, model generation 9 step 2760 "
                      "hash 90fcd54bdbc7179a, test accuracy 0.989, re-formations 8; model saved")
    assert end is not None and end.group(2, 3, 5) == ("done", "2760", "90fcd54bdbc7179a")
    left = _END.search("ringtrain node vm-abc: left the ring at step 311, model generation 7 "
                       "step 311 hash 1f1625b99ae99327, test accuracy 0.983")
    assert left is not None and left.group(2) == "left the ring"
    ring = _IN_RING.search("ringtrain node vm-abc: in a ring of 4 (generation 1) after 0.9 s")
    assert ring is not None and ring.groups() == ("vm-abc", "4", "1")
