"""Compressed all-reduce across real node processes: close to numpy within each codec's
bound, bit-identical on every node, error feedback carrying what one call left out into the
next, and a member with other compression settings refused with MismatchError."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from ringtrain.config import Settings
from ringtrain.testing import run_local

SEED = 99
N = 3
SIZES = (1, 2, 5, 70_001)  # below N, odd, several segments (with 64 KiB segments)
CODECS = ("fp16", "int8", "topk:0.25")
SETTINGS = Settings(segment_bytes=64 * 1024, progress_timeout=20.0, collective_timeout=40.0)
CALL_TIMEOUT = 20.0


def make_input(size: int, rank: int, call: int = 0) -> np.ndarray:
    return np.random.default_rng([SEED, size, rank, call]).standard_normal(size).astype(np.float32)


def digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def run_cases(node) -> dict:
    """Every codec and size, plain, weighted mean and fused; then repeated calls with error
    feedback; then a mismatch (rank 0 uses another codec), then a plain call."""
    out: dict = {}
    for codec in CODECS:
        for size in SIZES:
            x = make_input(size, node.rank)
            total = node.all_reduce(x, compression=codec, timeout=CALL_TIMEOUT)
            mean = node.all_reduce(x, op="mean", weight=float(node.rank + 1),
                                   compression=codec, timeout=CALL_TIMEOUT)
            many = node.all_reduce_many([x, x[:1] * 2], compression=codec, timeout=CALL_TIMEOUT)
            out[(codec, size)] = {"sum": total, "mean": mean, "many": many,
                                  "digests": [digest(total), digest(mean)] +
                                  [digest(m) for m in many]}
    # error feedback: the same gradient ten times; the running sum of results must track ten
    # times the true sum far better than one call's error suggests
    x = make_input(50_000, node.rank, call=1)
    running = np.zeros(x.size, np.float64)
    for _ in range(10):
        running += node.all_reduce(x, compression="int8", timeout=CALL_TIMEOUT)
    out["feedback"] = running
    try:
        node.all_reduce(np.ones(10, np.float32), compression="fp16" if node.rank == 0 else "int8",
                        timeout=CALL_TIMEOUT)
        out["mismatch"] = None
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        out["mismatch"] = (type(exc).__name__, str(exc))
    out["after"] = node.all_reduce(np.ones(3, np.float32), timeout=CALL_TIMEOUT).tolist()
    return out


def bound(codec: str, inputs: np.ndarray) -> float:
    """How far a compressed sum may be from the exact one, elementwise at most."""
    peak = float(np.abs(inputs).sum(axis=0).max())
    if codec == "fp16":
        return 2 * N * peak * 2.0 ** -10
    if codec == "int8":
        return 2 * N * peak / 254 + 1e-6
    return float("inf")  # top-k: checked separately (kept values exact-ish, rest dropped)


@pytest.fixture(scope="module")
def results():
    return run_local(run_cases, N, timeout=100.0, settings=SETTINGS, job="compressed")


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("size", SIZES)
def test_close_to_numpy_and_bit_identical_on_every_node(results, codec, size):
    inputs = np.stack([make_input(size, r) for r in range(N)])
    exact = inputs.astype(np.float64).sum(axis=0)
    weights = np.arange(1, N + 1, dtype=np.float64)[:, None]
    exact_mean = (inputs * weights).sum(axis=0) / weights.sum()
    cases = [r[(codec, size)] for r in results]
    assert all(c["digests"] == cases[0]["digests"] for c in cases), "nodes differ"
    got = cases[0]
    limit = bound(codec, inputs)
    if codec.startswith("topk"):
        # top-k only drops: the result is never further from the truth than the whole sum
        assert np.abs(got["sum"] - exact).max() <= np.abs(inputs).sum(axis=0).max() * N + 1e-5
        assert np.isfinite(got["sum"]).all()
        return
    assert np.abs(got["sum"] - exact).max() <= limit
    assert np.abs(got["many"][0] - exact).max() <= limit
    assert np.abs(got["many"][1] - 2 * inputs[:, :1].sum(axis=0)).max() <= 2 * limit
    # the weight travels exactly: the mean's error is the sum's error over the weights
    assert np.abs(got["mean"] - exact_mean).max() <= limit * N / weights.sum() + 1e-6


def test_error_feedback_carries_the_error_into_the_next_call(results):
    x = np.stack([make_input(50_000, r, call=1) for r in range(N)]).astype(np.float64)
    truth = 10 * x.sum(axis=0)
    one_call_bound = bound("int8", x)
    error = np.abs(results[0]["feedback"] - truth).max()
    assert all(np.array_equal(r["feedback"], results[0]["feedback"]) for r in results)
    # without feedback ten calls could be 10x one call's error; with it, about one call's
    assert error <= 1.5 * one_call_bound


def test_members_with_other_compression_raise_mismatch_and_go_on(results):
    for rank, r in enumerate(results):
        assert r["mismatch"] is not None, f"rank {rank} did not notice"
        kind, message = r["mismatch"]
        assert kind == "MismatchError", message
        assert "fp16" in message and "int8" in message, message
        assert r["after"] == [N] * 3


# compression only on slow links (measured links, Settings.slow_link_fraction) -------------------

LINK_MIXES = ((False, False, False), (True, False, False), (False, True, True),
              (True, True, True))


def slow_link_cases(node) -> dict:
    """For each mix of slow links, a compressed sum and weighted mean, and ten calls with error
    feedback; plus, as measured, with no link slow: the compressed sum next to the exact one.
    Which links count as slow depends on measured rates, which loopback does not control:
    the mixes are pinned on the node (the same on every member) to take every path."""
    out: dict = {"measured": node.state()["link_rates_mbit"]}
    x = make_input(70_001, node.rank)
    out["none slow"] = [node.all_reduce(x, compression="int8", timeout=CALL_TIMEOUT),
                        node.all_reduce(x, timeout=CALL_TIMEOUT)]
    for mix in LINK_MIXES:
        node._slow_links = mix
        total = node.all_reduce(x, compression="int8", timeout=CALL_TIMEOUT)
        mean = node.all_reduce(x, op="mean", weight=float(node.rank + 1), compression="int8",
                               timeout=CALL_TIMEOUT)
        feedback = make_input(50_000, node.rank, call=1)
        running = np.zeros(feedback.size, np.float64)
        for _ in range(10):
            running += node.all_reduce(feedback, compression="int8", timeout=CALL_TIMEOUT)
        out[mix] = {"sum": total, "mean": mean, "feedback": running, "rank": node.rank}
    return out


def test_compression_only_on_slow_links_is_exact_on_fast_ones_and_identical_everywhere():
    settings = Settings(segment_bytes=64 * 1024, progress_timeout=20.0, collective_timeout=40.0,
                        link_probe_bytes=128 * 1024, slow_link_fraction=1e-9)
    results = run_local(slow_link_cases, N, timeout=100.0, settings=settings, job="slow-links")
    assert results[0]["measured"] is not None
    for r in results:  # no link slower than a billionth of the fastest: no compression at all
        assert np.array_equal(r["none slow"][0], r["none slow"][1])
    inputs = np.stack([make_input(70_001, r) for r in range(N)])
    exact = inputs.astype(np.float64).sum(axis=0)
    limit = bound("int8", inputs)
    repeated = np.stack([make_input(50_000, r, call=1) for r in range(N)]).astype(np.float64)
    for mix in LINK_MIXES:
        got = [r[mix] for r in results]
        for name in ("sum", "mean", "feedback"):
            assert all(np.array_equal(g[name], got[0][name]) for g in got), (mix, name)
        error = np.abs(got[0]["sum"] - exact).max()
        if any(mix):
            assert error <= limit, mix
        else:
            assert error <= 1e-4, mix  # float32 rounding only
        # error feedback loses nothing over calls, whichever links encode
        assert np.abs(got[0]["feedback"] - 10 * repeated.sum(axis=0)).max() <= \
            1.5 * bound("int8", repeated), mix


def ragged_compressed(node) -> list:
    """int8 over the default 1 MiB segments, chunks of one full segment (its encoding takes
    ZeroMQ) and a short one (small enough for a same-host door)."""
    x = make_input(N * (262_144 + 1000), node.rank)
    return [digest(node.all_reduce(x, compression=codec, timeout=CALL_TIMEOUT))
            for codec in ("int8", "fp16")]


def test_segments_of_one_chunk_keep_their_order_across_door_and_zeromq_sizes():
    results = run_local(ragged_compressed, N, timeout=60.0, job="ragged-compressed",
                        settings=Settings(progress_timeout=20.0, collective_timeout=40.0))
    assert all(r == results[0] for r in results)
