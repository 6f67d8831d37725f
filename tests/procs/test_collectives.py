"""Every collective, across real node processes on 127.0.0.1, against numpy.

One cluster per world size runs every case inside the node function (a process costs about
half a second to start), and returns per case each output's sha256 plus, for small outputs,
the array itself. The parent rebuilds every rank's input from the same seeds, computes the
numpy reference and checks:

* results equal numpy's: bit-exact where the arithmetic is exact (integers, max/min, copies,
  and float sums of small integers, which is how the BIG-element cases are built), and
  within a rounding bound for random floats;
* results are bit-identical on every node (same sha256).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from ringtrain.config import Settings
from ringtrain.ring import plan as ring
from ringtrain.testing import run_local

SEED = 20240611
BIG = 400_009
SMALL_ENOUGH_TO_RETURN = 20_000  # outputs up to this many elements travel back whole
FLOATS = ("float16", "float32", "float64")
INTS = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
DTYPES = FLOATS + INTS
WEIGHTS = (0.0, 1.5, 0.5, 3.25, 2.0)  # exact in float16; rank 0 contributes nothing
CLUSTER_TIMEOUT = 100.0
CALL_TIMEOUT = 30.0


@dataclass(frozen=True)
class Case:
    """One collective call, made identically on every rank (inputs differ by rank)."""

    id: int
    kind: str  # all_reduce, many, async, reduce_scatter, all_gather, broadcast, barrier, layout
    dtype: str = "float32"
    shapes: tuple[tuple[int, ...], ...] = ((3,),)
    op: str = "sum"
    weighted: bool = False
    root: int = 0
    layout: str = ""  # for kind "layout": fortran, strided or bigendian

    def __str__(self) -> str:
        extra = f" root={self.root}" if self.kind == "broadcast" else ""
        extra += " weighted" if self.weighted else ""
        extra += f" {self.layout}" if self.layout else ""
        return (f"case {self.id}: {self.kind} {self.dtype} shapes={list(self.shapes)} "
                f"op={self.op}{extra}")


def weight_of(rank: int, world_size: int) -> float:
    return WEIGHTS[rank] if world_size > 1 else 2.0


def is_exact(case: Case, shape: tuple[int, ...]) -> bool:
    """Whether this input is built so that every result is exactly representable."""
    return case.dtype in INTS or math.prod(shape) > SMALL_ENOUGH_TO_RETURN


def make_input(case: Case, index: int, rank: int) -> np.ndarray:
    """Rank ``rank``'s array number ``index`` of a case: the same in the node and the parent."""
    shape = case.shapes[index]
    dtype = np.dtype(case.dtype)
    rng = np.random.default_rng([SEED, case.id, index, rank])
    size = math.prod(shape)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        flat = rng.integers(info.min, info.max, size=size, dtype=dtype, endpoint=True)
    elif is_exact(case, shape):
        flat = rng.integers(-8, 9, size=size).astype(dtype)  # sums are exact in any order
    else:
        flat = (rng.standard_normal(size) * 4).astype(dtype)
    array = flat.reshape(shape)
    if case.layout == "fortran":
        array = np.asfortranarray(array)
    elif case.layout == "strided":
        array = np.repeat(array, 2, axis=-1)[..., ::2]
    elif case.layout == "bigendian":
        array = array.astype(dtype.newbyteorder(">"))
    return array


def digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


# what every node runs -----------------------------------------------------------------------------

def call(node, case: Case) -> list[Any]:
    """Make the case's collective call; its outputs as a list."""
    arrays = [make_input(case, i, node.rank) for i in range(len(case.shapes))]
    weight = weight_of(node.rank, node.world_size) if case.weighted else None
    kw = {"timeout": CALL_TIMEOUT}
    if case.kind in ("all_reduce", "layout"):
        return [node.all_reduce(arrays[0], op=case.op, weight=weight, **kw)]
    if case.kind == "many":
        return node.all_reduce_many(arrays, op=case.op, weight=weight, **kw)
    if case.kind == "async":
        works = [node.all_reduce_async(a, op=case.op, weight=weight, **kw) for a in arrays]
        outputs = [work.wait(timeout=CALL_TIMEOUT) for work in reversed(works)][::-1]
        assert all(work.done() for work in works)
        return outputs
    if case.kind == "reduce_scatter":
        return [node.reduce_scatter(arrays[0], op=case.op, **kw)]
    if case.kind == "all_gather":
        return [node.all_gather(arrays[0], **kw)]
    if case.kind == "broadcast":
        return [node.broadcast(arrays[0], root=case.root, **kw)]
    if case.kind == "barrier":
        return [node.barrier(**kw)]
    raise AssertionError(case.kind)


def run_cases(node, cases: list[Case]) -> list[dict]:
    """The node function: every case in order, each outcome summarised."""
    outcomes = []
    for case in cases:
        sent = node.bytes_sent
        try:
            outputs = call(node, case)
        except Exception as exc:  # noqa: BLE001 - reported per case to the parent
            outcomes.append({"error": f"{type(exc).__name__}: {exc}"})
            continue
        summary: dict[str, Any] = {"bytes_sent": node.bytes_sent - sent, "outputs": []}
        for output in outputs:
            if output is None:
                summary["outputs"].append(None)
                continue
            summary["outputs"].append({
                "type": type(output).__name__, "dtype": str(output.dtype),
                "shape": output.shape, "sha256": digest(output),
                "array": output.copy() if output.size <= SMALL_ENOUGH_TO_RETURN else None})
        outcomes.append(summary)
    return outcomes


# the numpy reference ------------------------------------------------------------------------------

def reference(case: Case, n: int, rank: int) -> list[tuple[np.ndarray | None, np.ndarray | None]]:
    """For each output: (expected array, elementwise tolerance or None for bit-exact)."""
    if case.kind == "barrier":
        return [(None, None)]
    out = []
    for index, shape in enumerate(case.shapes):
        inputs = [make_input(case, index, r) for r in range(n)]
        dtype = np.dtype(case.dtype)
        exact = is_exact(case, shape) or case.op in ("max", "min")
        if case.kind == "all_gather":
            out.append((np.stack(inputs).astype(dtype), None))
            continue
        if case.kind == "broadcast":
            out.append((inputs[case.root].astype(dtype), None))
            continue
        stack = np.stack(inputs).astype(dtype)
        if case.op == "max":
            expected, tolerance = stack.max(axis=0), None
        elif case.op == "min":
            expected, tolerance = stack.min(axis=0), None
        elif dtype.kind in "iu":
            expected, tolerance = stack.sum(axis=0, dtype=dtype), None  # wraps like the ring
        else:
            expected, tolerance = float_reference(case, stack, n, exact)
        if case.kind == "reduce_scatter":
            lo, hi = ring.chunk_bounds(expected.size, n)[rank]
            expected = expected.reshape(-1)[lo:hi]
            tolerance = None if tolerance is None else tolerance.reshape(-1)[lo:hi]
        out.append((expected, tolerance))
    return out


def float_reference(case: Case, stack: np.ndarray, n: int, exact: bool):
    """Float sum, mean or weighted mean: exactly as the ring computes it when the inputs are
    small integers, else the float64 value and a bound on the rounding of n additions."""
    dtype = stack.dtype
    eps = float(np.finfo(dtype).eps)
    tiny = float(np.finfo(dtype).smallest_subnormal) * 4 * n
    wide = stack.astype(np.float64)
    if case.weighted:
        weights = np.array([weight_of(r, n) for r in range(n)])
        weights = weights.reshape((n,) + (1,) * (wide.ndim - 1))
        total = float(sum(weight_of(r, n) for r in range(n)))
        if exact:  # w * x and their sums are exact in the dtype: only the division rounds
            summed = np.asarray((wide * weights).sum(axis=0)).astype(dtype)
            return np.divide(summed, dtype.type(total)), None
        value = (wide * weights).sum(axis=0) / total
        bound = (n + 2) * eps * np.abs(wide * weights).sum(axis=0) / total + 2 * eps * np.abs(value)
        return value, bound + tiny
    if exact:
        summed = np.asarray(wide.sum(axis=0)).astype(dtype)
        if case.op == "mean":
            return np.divide(summed, dtype.type(n)), None
        return summed, None
    value = wide.sum(axis=0)
    bound = n * eps * np.abs(wide).sum(axis=0)
    if case.op == "mean":
        value = value / n
        bound = bound / n + 2 * eps * np.abs(value)
    return value, bound + tiny


# the cases ----------------------------------------------------------------------------------------

def cases_for(n: int) -> list[Case]:
    small = [(0,), (1,), (max(n - 1, 0),), (), (7, 11, 13), (2, 0, 3)]  # sizes 0, 1, < N, odd
    specs: list[dict] = []
    for dtype in DTYPES:
        for shape in small + [(BIG,)]:
            specs.append(dict(kind="all_reduce", dtype=dtype, shapes=(shape,)))
            specs.append(dict(kind="reduce_scatter", dtype=dtype, shapes=(shape,)))
        for op in ("max", "min"):
            specs.append(dict(kind="all_reduce", dtype=dtype, shapes=((7, 11, 13),), op=op))
            specs.append(dict(kind="all_reduce", dtype=dtype, shapes=((n + 2,),), op=op))
        for shape in small:
            specs.append(dict(kind="all_gather", dtype=dtype, shapes=(shape,)))
        specs.append(dict(kind="broadcast", dtype=dtype, shapes=((7, 11, 13),),
                          root=DTYPES.index(dtype) % n))
        specs.append(dict(kind="many", dtype=dtype,
                          shapes=((3, 4), (), (0,), (5,), (2, 3, 1), (1001,))))
    for dtype in FLOATS:
        for shape in small + [(BIG,)]:
            specs.append(dict(kind="all_reduce", dtype=dtype, shapes=(shape,), op="mean"))
            specs.append(dict(kind="all_reduce", dtype=dtype, shapes=(shape,), op="mean",
                              weighted=True))
        specs.append(dict(kind="all_reduce", dtype=dtype, shapes=((BIG,),), op="max"))
        specs.append(dict(kind="reduce_scatter", dtype=dtype, shapes=((7, 11, 13),), op="mean"))
        specs.append(dict(kind="many", dtype=dtype, shapes=((3, 4), (), (0,), (1001,), (BIG,)),
                          op="mean", weighted=True))
    for root in range(n):
        for shape in ((0,), (), (1,), (1001,)):
            specs.append(dict(kind="broadcast", dtype="float32", shapes=(shape,), root=root))
    specs.append(dict(kind="broadcast", dtype="float64", shapes=((BIG,),), root=n - 1))
    specs.append(dict(kind="all_gather", dtype="float32", shapes=((BIG,),)))
    specs.append(dict(kind="all_gather", dtype="uint8", shapes=((BIG,),)))
    specs.append(dict(kind="barrier"))
    specs.append(dict(kind="async", dtype="float32", shapes=((1001,), (BIG,), (1,))))
    specs.append(dict(kind="async", dtype="int64", shapes=((5,), (0,)), op="max"))
    specs.append(dict(kind="barrier"))
    for layout, dtype in (("fortran", "float64"), ("strided", "int32"), ("bigendian", "int32"),
                          ("bigendian", "float32")):
        specs.append(dict(kind="layout", dtype=dtype, shapes=((13, 77),), layout=layout))
    return [Case(i, **spec) for i, spec in enumerate(specs)]


# checking -----------------------------------------------------------------------------------------

def check(case: Case, n: int, outcomes: list[dict]) -> list[str]:
    """Everything wrong with one case across all ranks, as readable lines."""
    problems = []
    for rank, outcome in enumerate(outcomes):
        if "error" in outcome:
            problems.append(f"rank {rank} raised {outcome['error']}")
    if problems:
        return problems
    for rank, outcome in enumerate(outcomes):
        for index, ((expected, tolerance), got) in enumerate(
                zip(reference(case, n, rank), outcome["outputs"], strict=True)):
            where = f"rank {rank} output {index}"
            if expected is None:
                if got is not None:
                    problems.append(f"{where}: expected None, got {got['type']}")
                continue
            if got["type"] != "ndarray":
                problems.append(f"{where}: a {got['type']}, not an ndarray")
            if got["dtype"] != str(np.dtype(case.dtype)) or tuple(got["shape"]) != expected.shape:
                problems.append(f"{where}: {got['dtype']}{tuple(got['shape'])}, expected "
                                f"{np.dtype(case.dtype)}{expected.shape}")
                continue
            if tolerance is None:
                if got["sha256"] != digest(expected.astype(case.dtype)):
                    detail = ""
                    if got["array"] is not None:
                        bad = np.flatnonzero(got["array"].reshape(-1) != expected.reshape(-1))
                        detail = (f" at {bad.size} positions, first {bad[:5].tolist()}: got "
                                  f"{got['array'].reshape(-1)[bad[:5]]}, expected "
                                  f"{expected.reshape(-1)[bad[:5]]}")
                    problems.append(f"{where}: not bit-exact with numpy{detail}")
                continue
            array = got["array"].astype(np.float64)
            error = np.abs(array - expected)
            if not np.all(error <= tolerance):
                worst = int(np.argmax(error - tolerance))
                problems.append(f"{where}: off by {error.reshape(-1)[worst]:.3g} > tolerance "
                                f"{tolerance.reshape(-1)[worst]:.3g} at {worst}")
    if case.kind != "reduce_scatter":
        hashes = {tuple(o["sha256"] if o else None for o in outcome["outputs"])
                  for outcome in outcomes}
        if len(hashes) != 1:
            problems.append(f"results differ between nodes: {len(hashes)} distinct")
    return problems


def run_and_check(n: int, cases: list[Case], settings: Settings | None = None) -> list[list]:
    results = run_local(run_cases, n, args=(cases,), timeout=CLUSTER_TIMEOUT, settings=settings,
                        job=f"collectives-{n}")
    failures = []
    for index, case in enumerate(cases):
        problems = check(case, n, [results[rank][index] for rank in range(n)])
        if problems:
            failures.append(f"{case}:\n    " + "\n    ".join(problems[:6]))
    assert not failures, (f"{len(failures)} of {len(cases)} cases failed with N={n}:\n"
                          + "\n".join(failures[:20]))
    return results


# tests --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_every_collective_dtype_and_size_against_numpy(n):
    cases = cases_for(n)
    results = run_and_check(n, cases)
    # a single node moves no data at all
    if n == 1:
        assert all(o.get("bytes_sent") == 0 for o in results[0])
        return
    # ring-allreduce proper: each node sends 2(N-1)/N of the buffer, chunk sizes as planned
    for case_index, case in enumerate(cases):
        if case.kind == "all_reduce" and case.shapes == ((BIG,),) and not case.weighted:
            itemsize = np.dtype(case.dtype).itemsize
            bounds = ring.chunk_bounds(BIG, n)
            for rank in range(n):
                sizes = [hi - lo for lo, hi in bounds]
                sent = 2 * BIG - sizes[(rank + 1) % n] - sizes[(rank + 2) % n]
                assert results[rank][case_index]["bytes_sent"] == sent * itemsize, (case, rank)


def many_segments_cases() -> list[Case]:
    specs = [dict(kind="all_reduce", dtype="float32", shapes=((BIG,),)),
             dict(kind="all_reduce", dtype="float64", shapes=((BIG,),), op="mean"),
             dict(kind="all_reduce", dtype="int16", shapes=((3, 1001),)),
             dict(kind="all_reduce", dtype="float16", shapes=((7, 11, 13),), op="mean",
                  weighted=True),
             dict(kind="reduce_scatter", dtype="int64", shapes=((100_003,),)),
             dict(kind="all_gather", dtype="float32", shapes=((10_007,),)),
             dict(kind="broadcast", dtype="float64", shapes=((100_001,),), root=1),
             dict(kind="many", dtype="float32", shapes=((300, 7), (), (5000,), (0,))),
             dict(kind="async", dtype="uint32", shapes=((65_537,), (3,))),
             dict(kind="barrier")]
    return [Case(1000 + i, **spec) for i, spec in enumerate(specs)]


@pytest.mark.parametrize("n", [2, 3])
def test_many_small_segments_pipeline_correctly(n):
    """4 KiB segments: a 4 MB buffer goes round as ~1000 messages per chunk-hop."""
    run_and_check(n, many_segments_cases(), Settings(segment_bytes=4096))


def ragged_cases() -> list[Case]:
    """Sizes that do not divide evenly by the segment size or the world size."""
    specs = [dict(kind="all_reduce", dtype=d, shapes=((s,),)) for d in ("float64", "int8")
             for s in (1, 2, 3, 511, 512, 513, 1023, 1025, 4097)]
    specs += [dict(kind="broadcast", dtype="int8", shapes=((s,),), root=r)
              for s in (511, 512, 513) for r in (0, 2)]
    return [Case(2000 + i, **spec) for i, spec in enumerate(specs)]


def test_sizes_around_the_segment_size():
    """segment_bytes=4096: 512 float64 or 4096 int8 elements per segment."""
    run_and_check(3, ragged_cases(), Settings(segment_bytes=4096))


# argument errors are the caller's, raised on every node, and the ring goes on ---------------------

def argument_errors(node) -> dict:
    outcome = {}
    for name, call_it in (
            ("mean of ints", lambda: node.all_reduce(np.arange(3), op="mean", timeout=10)),
            ("unknown op", lambda: node.all_reduce(np.ones(3), op="prod", timeout=10)),
            ("weight with sum", lambda: node.all_reduce(np.ones(3), weight=2.0, timeout=10)),
            ("negative weight", lambda: node.all_reduce(np.ones(3), op="mean", weight=-1.0,
                                                        timeout=10)),
            ("bool dtype", lambda: node.all_reduce(np.ones(3, dtype=bool), timeout=10)),
            ("complex dtype", lambda: node.all_reduce(np.ones(3, dtype=np.complex64),
                                                      timeout=10)),
            ("mixed dtypes", lambda: node.all_reduce_many([np.ones(2), np.ones(2, np.float32)],
                                                          timeout=10)),
            ("bad root", lambda: node.broadcast(np.ones(2), root=node.world_size, timeout=10)),
            ("zero weights", lambda: node.all_reduce(np.ones(2), op="mean", weight=0.0,
                                                     timeout=10))):
        started = time.monotonic()
        try:
            call_it()
            outcome[name] = ("no error", 0.0)
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            outcome[name] = (type(exc).__name__, time.monotonic() - started)
    outcome["after"] = node.all_reduce(np.full(4, node.rank + 1.0), timeout=10).tolist()
    return outcome


def test_argument_errors_raise_config_error_on_every_node_and_the_ring_goes_on():
    n = 3
    results = run_local(argument_errors, n, timeout=60.0, job="argument-errors")
    for rank, outcome in enumerate(results):
        after = outcome.pop("after")
        assert after == [n * (n + 1) / 2] * 4, (rank, after)
        for name, (error, elapsed) in outcome.items():
            assert error == "ConfigError", f"rank {rank}, {name}: {error}"
            assert elapsed < 5, f"rank {rank}, {name}: took {elapsed:.1f} s"


def fuse_many(node, count: int) -> dict:
    """A model's worth of small gradients: many arrays, varied shapes, one fused pass."""
    arrays = [np.full((1 + i % 3, 2), node.rank + 1.0 + i, dtype=np.float32)
              for i in range(count)]
    started = time.monotonic()
    try:
        outputs = node.all_reduce_many(arrays, timeout=CALL_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        return {"error": f"{type(exc).__name__}: {exc}"[:500],
                "elapsed": time.monotonic() - started}
    n = node.world_size
    wrong = [i for i, out in enumerate(outputs)
             if out.shape != arrays[i].shape
             or not np.array_equal(out, np.full(out.shape, n * (n + 1) / 2 + n * i))]
    return {"error": None, "wrong": wrong[:5], "count": len(outputs),
            "sha256": hashlib.sha256(b"".join(o.tobytes() for o in outputs)).hexdigest()}


@pytest.mark.parametrize("count", [100, 5000])
def test_all_reduce_many_fuses_thousands_of_arrays(count):
    """5000 arrays make a descriptor (their shapes) of ~30 KB: the collective must still run."""
    n = 3
    results = run_local(fuse_many, n, args=(count,), timeout=60.0, job=f"fuse-{count}",
                        settings=Settings(progress_timeout=5.0))
    for rank, outcome in enumerate(results):
        assert outcome["error"] is None, (rank, outcome)
        assert outcome["count"] == count and outcome["wrong"] == [], (rank, outcome)
    assert len({o["sha256"] for o in results}) == 1


def lanes_and_sums(node) -> dict:
    """Which peers this node reaches through shared memory, and a few ring all-reduces."""
    rng = np.random.default_rng(SEED + node.rank)
    sums = []
    for size in (5_000, BIG, 3 * BIG):
        data = rng.standard_normal(size)
        sums.append(hashlib.sha256(node.all_reduce(data, out=data).tobytes()).hexdigest())
    return {"lanes": node.state()["shared_memory_peers"], "sums": sums}


@pytest.mark.parametrize("segment_bytes", [1 << 16, 1 << 20])
def test_same_host_peers_share_memory_and_tcp_gives_identical_results(segment_bytes):
    """On one host the ring's segments go through shared-memory lanes (shm.py); with
    ``shm_lane_bytes=0`` they go over TCP, 1 MiB segments in CURVE pieces
    (``transport.CURVE_PIECE_BYTES``). Both give bit-identical sums."""
    n = 3
    shared = run_local(lanes_and_sums, n, timeout=60.0, job="lanes-on",
                       settings=Settings(segment_bytes=segment_bytes))
    tcp = run_local(lanes_and_sums, n, timeout=60.0, job="lanes-off",
                    settings=Settings(segment_bytes=segment_bytes, shm_lane_bytes=0))
    for rank in range(n):
        others = sorted(f"node-{r:02d}" for r in range(n) if r != rank)
        assert shared[rank]["lanes"] == others, shared[rank]
        assert tcp[rank]["lanes"] == [], tcp[rank]
        assert shared[rank]["sums"] == tcp[rank]["sums"] == shared[0]["sums"]


def ranked_cases(node, cases: list[Case]) -> dict:
    """``run_cases``, with the ring this node ran them in and what it measured."""
    return {"rank": node.rank, "members": node.members, "node": node.node_id,
            "links": node.state()["link_rates_mbit"], "outcomes": run_cases(node, cases)}


def test_a_ring_ordered_by_measured_links_agrees_and_computes_the_same():
    """With ``link_probe_bytes`` the members measure every link and may reorder the ring;
    ranks then follow the measured order. Every member must hold the same order and every
    collective must still match numpy, rank by rank in that order."""
    n = 4
    cases = cases_for(n)
    results = run_local(ranked_cases, n, args=(cases,), timeout=CLUSTER_TIMEOUT,
                        settings=Settings(link_probe_bytes=256 * 1024), job="ordered")
    members = results[0]["members"]
    assert sorted(members) == [f"node-{i:02d}" for i in range(n)]
    for result in results:
        assert result["members"] == members, "members disagree on the ring order"
        assert members[result["rank"]] == result["node"]
        links = result["links"]
        assert links is not None and sorted(links) == sorted(members)
        assert all(len(row) == n - 1 and min(row.values()) > 0 for row in links.values()), links
        assert links == results[0]["links"], "members hold different measurements"
    by_rank = sorted(results, key=lambda result: result["rank"])
    failures = []
    for index, case in enumerate(cases):
        problems = check(case, n, [by_rank[rank]["outcomes"][index] for rank in range(n)])
        if problems:
            failures.append(f"{case}: {problems[:3]}")
    assert not failures, f"ring {members}:\n" + "\n".join(failures[:20])


def small_sums(node, iterations: int) -> list[list[int]]:
    """Many one-round all-reduces of 1024 integers; rank 0 comes late to every tenth, later
    than any spin (Settings.spin_seconds), so the others then sleep in poll."""
    rng = np.random.default_rng(SEED + node.rank)
    results = []
    for index in range(iterations):
        if node.rank == 0 and index % 10 == 0:
            time.sleep(0.005)
        data = rng.integers(-1000, 1000, 1024)
        results.append(node.all_reduce(data, out=data).tolist())
    return results


@pytest.mark.parametrize("spin", [0.0, 300e-6], ids=["sleep", "spin"])
def test_small_all_reduces_are_exact_whether_waits_spin_or_sleep(spin):
    n, iterations = 4, 40
    results = run_local(small_sums, n, args=(iterations,), timeout=60.0,
                        job=f"spin-{int(spin * 1e6)}", settings=Settings(spin_seconds=spin))
    rngs = [np.random.default_rng(SEED + rank) for rank in range(n)]
    for index in range(iterations):
        expected = sum(rng.integers(-1000, 1000, 1024) for rng in rngs).tolist()
        for rank in range(n):
            assert results[rank][index] == expected, f"rank {rank}, call {index}"


def _gather_with_members(node):
    work = node.all_gather_async(np.array([node.rank]))
    return work.wait().ravel().tolist(), list(work.members), list(node.members)


def test_a_collective_names_the_members_of_the_view_it_ran_in():
    # a caller zips rows with work.members, not node.members: the node may hold the next
    # view (a joiner admitted) by the time the caller reads it (agent pool rounds crashed so)
    results = run_local(_gather_with_members, 3)
    for gathered, members, now in results:
        assert gathered == [0, 1, 2]
        assert members == now == results[0][1] and len(members) == 3
