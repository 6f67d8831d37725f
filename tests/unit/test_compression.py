"""The compression codecs, pure: round trips within each codec's bound, error feedback that
loses nothing over time, top-k keeping the largest values, one int8 scale per segment, and
payloads from a peer that cannot be right refused."""

from __future__ import annotations

import numpy as np
import pytest

from ringtrain.errors import ConfigError, ProtocolError
from ringtrain.ring.compression import (
    SCRATCH_LIMIT,
    Codec,
    Fp16,
    Int4,
    Int8,
    TopK,
    check_supported,
    get_codec,
    scratch,
)

RNG = np.random.default_rng(7)


def values(n: int = 1000, dtype: str = "float32", scale: float = 3.0) -> np.ndarray:
    return (RNG.standard_normal(n) * scale).astype(dtype)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("n", [0, 1, 2, 7, 1000])
@pytest.mark.parametrize("codec", [Fp16(), Int8(), Int4(), TopK(0.1)], ids=str)
def test_round_trip_has_the_promised_size_dtype_and_bound(codec, n, dtype):
    x = values(n, dtype)
    payload, decoded = codec.round_trip(x)
    assert payload.dtype == np.uint8 and payload.size == codec.payload_bytes(n, x.dtype)
    assert decoded.dtype == x.dtype and decoded.shape == x.shape
    if n == 0:
        return
    error = np.abs(decoded.astype(np.float64) - x.astype(np.float64))
    peak = float(np.abs(x).max())
    if isinstance(codec, Fp16):
        assert error.max() <= peak * 2.0 ** -10
    elif isinstance(codec, Int8):
        # half a step of max|x|/127, plus the rounding of float16 inputs and outputs
        slack = peak * 2.0 ** -10 if dtype == "float16" else peak * 1e-6
        assert error.max() <= peak / 254 + slack
    elif isinstance(codec, Int4):
        slack = peak * 2.0 ** -10 if dtype == "float16" else peak * 1e-6
        assert error.max() <= peak / 14 + slack
    else:
        kept = decoded != 0
        assert kept.sum() <= codec.kept(n)
        np.testing.assert_array_equal(decoded[kept], x[kept])


def test_decoding_is_deterministic_so_every_node_gets_the_same_bits():
    x = values(4096)
    for codec in (Fp16(), Int8(), TopK(0.05)):
        payload, first = codec.round_trip(x)
        again = np.empty_like(x)
        codec.decode(payload.copy(), again)
        assert first.tobytes() == again.tobytes()


def test_int8_uses_one_scale_per_segment():
    small, large = values(100, scale=0.001), values(100, scale=1000.0)
    codec = Int8()
    p_small, d_small = codec.round_trip(small)
    p_large, d_large = codec.round_trip(large)
    assert p_small[:4].view("<f4")[0] == pytest.approx(np.abs(small).max() / 127, rel=1e-6)
    assert p_large[:4].view("<f4")[0] == pytest.approx(np.abs(large).max() / 127, rel=1e-6)
    # each segment is quantized relative to its own peak, so the small one keeps its detail
    assert np.abs(d_small - small).max() <= np.abs(small).max() / 254 * 1.001
    assert np.abs(p_large[4:].view(np.int8)).max() == 127


def test_int8_of_zeros_and_non_finite_values():
    codec = Int8()
    _, decoded = codec.round_trip(np.zeros(5, np.float32))
    assert not decoded.any()
    x = values(5)
    x[2] = np.nan
    _, decoded = codec.round_trip(x)
    assert np.isnan(decoded).all()  # a NaN gradient stays visible on every node


def test_fp16_saturates_instead_of_overflowing():
    _, decoded = Fp16().round_trip(np.array([1e6, -1e6, 1.0], np.float32))
    assert np.isfinite(decoded).all() and decoded[0] == 65504 and decoded[1] == -65504


def test_topk_keeps_exactly_the_largest_magnitudes():
    x = np.array([0.1, -9.0, 0.2, 5.0, -0.3, 0.0, 7.0, 0.05, -0.01, 1.0], np.float32)
    codec = TopK(0.3)
    assert codec.kept(10) == 3
    _, decoded = codec.round_trip(x)
    expected = np.zeros_like(x)
    expected[[1, 3, 6]] = x[[1, 3, 6]]
    np.testing.assert_array_equal(decoded, expected)


def test_topk_keeps_at_least_one_value():
    assert TopK(0.001).kept(10) == 1 and TopK(0.5).kept(0) == 0


@pytest.mark.parametrize("codec", [Int8(), Int4(), TopK(0.05)], ids=str)
def test_error_feedback_makes_the_accumulated_error_stay_bounded(codec):
    """Send the same gradient many times: with error feedback, the sum of what was decoded
    tracks the sum of what was meant (error bounded by one step's residual); without it, the
    error grows with the number of steps."""
    x = values(2000, scale=1.0)
    steps = 50
    residual = np.zeros_like(x)
    with_feedback = np.zeros(x.size, np.float64)
    without = np.zeros(x.size, np.float64)
    for _ in range(steps):
        corrected = x + residual
        _, decoded = codec.round_trip(corrected)
        residual = corrected - decoded
        with_feedback += decoded
        without += codec.round_trip(x)[1]
    truth = steps * x.astype(np.float64)
    error_with = np.abs(with_feedback - truth).max()
    error_without = np.abs(without - truth).max()
    assert error_with <= np.abs(residual).max() + 1e-3  # only the last residual is missing
    assert error_with < error_without / 5


def test_residuals_are_kept_per_key_and_reset_when_the_size_changes():
    codec = Int8()
    first = codec.residual("a", 10, np.dtype("float32"))
    first[:] = 1
    assert codec.residual("a", 10, np.dtype("float32")) is first
    assert not codec.residual("b", 10, np.dtype("float32")).any()
    assert not codec.residual("a", 11, np.dtype("float32")).any()
    assert Fp16().residual("a", 10, np.dtype("float32")) is None  # fp16: no feedback


def test_bad_payloads_from_a_peer_are_protocol_errors():
    out = np.empty(10, np.float32)
    payload, _ = TopK(0.2).round_trip(values(10))
    payload[:4].view("<u4")[0] = 10_000  # an index beyond the segment
    with pytest.raises(ProtocolError, match="index"):
        TopK(0.2).decode(payload, out)
    with pytest.raises(ProtocolError):
        Int8().decode(np.zeros(5, np.uint8), out)
    with pytest.raises(ProtocolError):
        Fp16().decode(np.zeros(5, np.uint8), out)
    with pytest.raises(ProtocolError):
        Int4().decode(np.zeros(5, np.uint8), out)


def test_int4_packs_two_values_a_byte_and_keeps_zeros_and_non_finite_visible():
    codec = Int4()
    assert codec.payload_bytes(7, np.dtype(np.float32)) == 4 + 4
    payload, decoded = codec.round_trip(np.array([7.0, -7.0, 0.0, 1.0, -3.0], np.float32))
    np.testing.assert_array_equal(decoded, [7.0, -7.0, 0.0, 1.0, -3.0])  # exact levels
    _, zeros = codec.round_trip(np.zeros(3, np.float32))
    np.testing.assert_array_equal(zeros, np.zeros(3))
    _, poisoned = codec.round_trip(np.array([1.0, np.nan], np.float32))
    assert np.isnan(poisoned).all()


def test_codec_names():
    assert get_codec(None) is None and get_codec("none") is None
    assert isinstance(get_codec("fp16"), Fp16) and not get_codec("fp16").error_feedback
    assert isinstance(get_codec("int8"), Int8) and get_codec("int8").error_feedback
    assert not get_codec("int8-ef").error_feedback
    topk = get_codec("topk:0.05")
    assert isinstance(topk, TopK) and topk.ratio == 0.05 and topk.spec() == "topk:0.05+ef"
    codec = Int8()
    assert get_codec(codec) is codec
    for bad in ("int3", "int4:2", "topk:x", "topk:0", "topk:2", "fp16:3"):
        with pytest.raises(ConfigError):
            get_codec(bad)


def test_compression_is_for_float_sums_and_means():
    check_supported(Int8(), np.dtype("float32"), "mean")
    with pytest.raises(ConfigError, match="float"):
        check_supported(Int8(), np.dtype("int32"), "sum")
    with pytest.raises(ConfigError, match="op"):
        check_supported(Int8(), np.dtype("float32"), "max")


def test_base_codec_is_abstract():
    with pytest.raises(NotImplementedError):
        Codec().payload_bytes(3, np.dtype("float32"))


def _unfused(codec: Codec, x: np.ndarray, carried: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(payload, residual, decoded) the long way: add the carried residual, encode, decode,
    subtract."""
    corrected = x + carried
    payload, decoded = codec.round_trip(corrected)
    with np.errstate(invalid="ignore"):
        residual = corrected - decoded
    residual[~np.isfinite(residual)] = 0
    return payload, residual, decoded


def _fused(codec: Codec, x: np.ndarray, carried: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    payload = np.empty(codec.payload_bytes(x.size, x.dtype), np.uint8)
    residual = carried.copy()
    replaced = x.copy()
    codec.encode_feedback(replaced, payload, residual, replace=True)
    return payload, residual, replaced


EDGE_CASES = {
    "normal": values(3000),
    "zeros": np.zeros(50, np.float32),
    "all equal": np.full(50, -2.5, np.float32),
    "one value": np.array([3.0], np.float32),
    "float32 extremes": np.array([3.4e38, -3.4e38, 1.0, 0.0], np.float32),
    "subnormal scale": np.array([1e-39, -3e-40, 5e-41, 0.0], np.float32),
    "scale underflows": np.array([1e-44, -3e-45, 0.0], np.float32),
    "float64 beyond float32": np.array([1e300, -1.0, 2.0]),
    "nan": np.array([1.0, np.nan, -2.0], np.float32),
    "inf": np.array([1.0, -np.inf, 2.0], np.float32),
}


@pytest.mark.parametrize("carried", ["zero", "small"])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("case", sorted(EDGE_CASES))
@pytest.mark.parametrize("codec", [Int8(), Int4(), TopK(0.5), Fp16()], ids=str)
def test_encode_feedback_is_add_encode_decode_subtract_bit_for_bit(codec, case, dtype, carried):
    """The fused int8 and int4 paths (and the generic one of the others) write the same payload, the
    same residual and the same replaced values as adding the carried residual, encoding,
    decoding and subtracting: the owner's values must be bit for bit what every other node
    decodes."""
    with np.errstate(over="ignore", under="ignore"):
        x = EDGE_CASES[case].astype(dtype)
    residual = np.zeros_like(x) if carried == "zero" else \
        (RNG.standard_normal(x.size) * 0.01).astype(dtype)
    with np.errstate(invalid="ignore", over="ignore"):
        expected = _unfused(codec, x, residual)
        got = _fused(codec, x, residual)
    assert got[0].tobytes() == expected[0].tobytes(), "payload"
    np.testing.assert_array_equal(got[1], expected[1], "residual")  # a -0.0 may be +0.0
    assert got[2].tobytes() == expected[2].tobytes(), "replaced values differ in some bit"


@pytest.mark.parametrize("codec", [Int8(), Int4(), TopK(0.5)], ids=str)
def test_encode_feedback_without_residual_encodes_and_replaces(codec):
    x = values(300)
    payload, decoded = codec.round_trip(x)
    fused = np.empty_like(payload)
    replaced = x.copy()
    codec.encode_feedback(replaced, fused, replace=True)
    assert fused.tobytes() == payload.tobytes() and replaced.tobytes() == decoded.tobytes()


def test_int8_edge_cases_decode_as_promised():
    codec = Int8()

    def fused(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return _fused(codec, x, np.zeros_like(x))

    for case in ("zeros", "scale underflows"):
        x = EDGE_CASES[case]
        _, residual, decoded = fused(x)
        assert not decoded.any()
        np.testing.assert_array_equal(residual, x)  # nothing lost: all of it waits in feedback
    x = EDGE_CASES["all equal"]
    payload, _, decoded = fused(x)
    assert (payload[4:].view(np.int8) == -127).all()
    np.testing.assert_allclose(decoded, x, rtol=1e-6)
    for case in ("float32 extremes", "subnormal scale"):
        x = EDGE_CASES[case]
        payload, residual, decoded = fused(x)
        assert np.abs(payload[4:].view(np.int8)).max() == 127
        peak = float(np.abs(x).max())
        assert np.abs(decoded.astype(np.float64) - x).max() <= peak / 254 * 1.01
        assert np.isfinite(residual).all()
    for case in ("nan", "inf", "float64 beyond float32"):
        _, residual, decoded = fused(EDGE_CASES[case])
        assert not np.isfinite(decoded).any()  # visible on every node
        assert not residual.any()  # and not carried into the next call


def test_error_feedback_through_encode_feedback_loses_nothing_over_time():
    """The residual carried from call to call by encode_feedback alone: the decoded sum over
    many calls tracks the true sum within one call's residual."""
    codec, x = Int8(), values(2000, scale=1.0)
    residual = np.zeros_like(x)
    total = np.zeros(x.size, np.float64)
    payload = np.empty(codec.payload_bytes(x.size, x.dtype), np.uint8)
    decoded = np.empty_like(x)
    for _ in range(50):
        codec.encode_feedback(x, payload, residual)
        codec.decode(payload, decoded)
        total += decoded
    np.testing.assert_allclose(total + residual, 50 * x.astype(np.float64), atol=1e-3)


def test_scratch_is_reused_per_dtype_and_not_kept_when_huge():
    first = scratch(10, np.float32)
    assert scratch(5, np.float32).base is first.base
    assert scratch(5, np.float64).dtype == np.float64
    assert scratch(SCRATCH_LIMIT + 1, np.uint8).base is None
