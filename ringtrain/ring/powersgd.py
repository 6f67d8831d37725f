"""PowerSGD: a low-rank compression of a gradient's matrices, exchanged as two dense all-reduces.

Vogels, Karimireddy & Jaggi, "PowerSGD" (NeurIPS 2019). Pure numpy, no I/O: the caller runs
the all-reduces (sums) between the three stages, every member in the same order.

For each matrix ``M`` (rows x cols) of a member's weighted gradient, plus what earlier steps
left out of it (error feedback):

1. :meth:`PowerSGD.first`: ``P = M Q`` (rows x rank), with ``Q`` (cols x rank) the previous
   step's (warm start; a seeded random one the first time, the same on every member). The
   buffer to sum holds every P and, uncompressed, every vector (biases) and every matrix too
   small to gain from compression.
2. :meth:`PowerSGD.second`, on the summed buffer: orthonormalise the summed ``P`` (its columns
   span the members' gradients' dominant column space), then ``Q = M^T P``. The buffer to sum
   holds every Q.
3. :meth:`PowerSGD.finish`, on the summed Qs: the sum of the members' matrices is
   approximated by ``P Q^T``, written into the result; what this member's ``M`` loses in the
   projection, ``M - P P^T M``, is kept and added to its next gradient.

Bytes on the wire per matrix: ``(rows + cols) x rank`` instead of ``rows x cols``. At a rank
at least ``min(rows, cols)`` the projection keeps everything, so the result is the exact sum
(up to float rounding): the tests hold this.

Every member orthonormalises the same summed P and multiplies the same summed Q, so every
member ends with the same result when they run the same numpy build (the QR and the matrix
products go through LAPACK and BLAS, whose rounding can differ between builds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError

__all__ = ["PowerSGD", "parse_powersgd"]

DEFAULT_RANK = 4


class PowerSGD:
    """Rank-``rank`` compression of the matrices of a flat gradient laid out as ``shapes``.

    Args:
        shapes: the shape of each tensor in the flat buffer, in buffer order (e.g. a
            model's ``parameter_layout``).
        rank: columns of the factors, >= 1.
        error_feedback: keep what each step's projection left out for the next step.
        seed: of the first ``Q`` (every member must use the same).
        dtype: the gradient's float dtype.
        only_smaller: send a matrix as factors only when they are smaller than the matrix
            (False: every matrix, e.g. to check the factors at full rank).

    Raises:
        ConfigError: a rank below 1, or a dtype that is not float32/float64.
    """

    name = "powersgd"

    def __init__(self, shapes: Sequence[tuple[int, ...]], rank: int = DEFAULT_RANK, *,
                 error_feedback: bool = True, seed: int = 0, dtype: np.dtype | type = np.float32,
                 only_smaller: bool = True):
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"PowerSGD rank must be a positive integer, got {rank!r}")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise ConfigError(f"PowerSGD needs float32 or float64 gradients, got {self.dtype}")
        self.rank = rank
        self.error_feedback = error_feedback
        self.size = 0
        self.matrices: list[tuple[int, int, int, int]] = []  # (offset, rows, cols, rank)
        self.dense: list[tuple[int, int]] = []  # (offset, size) travelling uncompressed
        for shape in shapes:
            size = math.prod(shape)
            if len(shape) >= 2:
                rows, cols = shape[0], size // shape[0]
                r = min(rank, rows, cols)
                if (rows + cols) * r < rows * cols or not only_smaller:
                    self.matrices.append((self.size, rows, cols, r))
                    self.size += size
                    continue
            self.dense.append((self.size, size))
            self.size += size
        self.dense_size = sum(size for _, size in self.dense)
        self.p_size = sum(rows * r for _, rows, _, r in self.matrices)
        self.q_size = sum(cols * r for _, _, cols, r in self.matrices)
        rng = np.random.default_rng(seed)
        self._q = [rng.standard_normal((cols, r)).astype(self.dtype)
                   for _, _, cols, r in self.matrices]
        self._residual = np.zeros(self.size, self.dtype) if error_feedback else None
        self._corrected: np.ndarray | None = None
        self._p: list[np.ndarray] = []

    def spec(self) -> str:
        """The compression as members agree on it."""
        return f"powersgd:{self.rank}" + ("" if self.error_feedback else "-ef")

    @property
    def first_size(self) -> int:
        """Elements of the first buffer: every uncompressed value, then every P."""
        return self.dense_size + self.p_size

    @property
    def second_size(self) -> int:
        """Elements of the second buffer: every Q."""
        return self.q_size

    def wire_elements(self) -> int:
        """Elements all-reduced per step (both buffers), against ``size`` uncompressed."""
        return self.first_size + self.second_size

    def first(self, gradient: np.ndarray, out: np.ndarray) -> None:
        """Stage 1: write this member's uncompressed values and P factors of ``gradient``
        (already weighted) into ``out`` (``first_size`` elements), for a sum."""
        self._check(gradient, self.size, "gradient")
        self._check(out, self.first_size, "first buffer")
        corrected = gradient if self._residual is None else np.add(gradient, self._residual)
        self._corrected = corrected
        at = 0
        for offset, size in self.dense:
            out[at:at + size] = corrected[offset:offset + size]
            at += size
        for (offset, rows, cols, r), q in zip(self.matrices, self._q, strict=True):
            matrix = corrected[offset:offset + rows * cols].reshape(rows, cols)
            np.matmul(matrix, q, out=out[at:at + rows * r].reshape(rows, r))
            at += rows * r

    def second(self, summed: np.ndarray, out: np.ndarray) -> None:
        """Stage 2: from the summed first buffer, orthonormalise each P and write this
        member's Q factors (``M^T P``) into ``out`` (``second_size`` elements), for a sum."""
        if self._corrected is None:
            raise ConfigError("PowerSGD.second called before first")
        self._check(summed, self.first_size, "summed first buffer")
        self._check(out, self.second_size, "second buffer")
        at, q_at = self.dense_size, 0
        self._p = []
        for offset, rows, cols, r in self.matrices:
            p = orthonormal(summed[at:at + rows * r].reshape(rows, r))
            self._p.append(p)
            matrix = self._corrected[offset:offset + rows * cols].reshape(rows, cols)
            np.matmul(matrix.T, p, out=out[q_at:q_at + cols * r].reshape(cols, r))
            at += rows * r
            q_at += cols * r

    def finish(self, first: np.ndarray, second: np.ndarray, out: np.ndarray) -> None:
        """Stage 3: write the approximate sum of the members' gradients into ``out`` (the
        gradient's size): uncompressed values from the summed ``first``, each matrix as
        ``P Q^T`` from the summed ``second``; keep what this member's projection left out."""
        if self._corrected is None or len(self._p) != len(self.matrices):
            raise ConfigError("PowerSGD.finish called before first and second")
        self._check(first, self.first_size, "summed first buffer")
        self._check(second, self.second_size, "summed second buffer")
        self._check(out, self.size, "result")
        corrected, self._corrected = self._corrected, None
        at = 0
        for offset, size in self.dense:
            out[offset:offset + size] = first[at:at + size]
            at += size
        q_at = 0
        for index, ((offset, rows, cols, r), p) in enumerate(zip(self.matrices, self._p,
                                                                 strict=True)):
            q = second[q_at:q_at + cols * r].reshape(cols, r)
            q_at += cols * r
            if self._residual is not None:
                # what the projection onto P leaves out of this member's own matrix
                mine = corrected[offset:offset + rows * cols].reshape(rows, cols)
                kept = p @ (p.T @ mine)
                np.subtract(mine, kept, out=self._residual[offset:offset + rows * cols]
                            .reshape(rows, cols))
            np.matmul(p, q.T, out=out[offset:offset + rows * cols].reshape(rows, cols))
            if np.isfinite(q).all():
                self._q[index] = q.copy()  # warm start: next step's power iteration from here
        if self._residual is not None and not np.isfinite(self._residual).all():
            self._residual[...] = 0

    def clear_feedback(self) -> None:
        """Forget what earlier steps left out (after a non-finite result or a re-form)."""
        if self._residual is not None:
            self._residual[...] = 0
        self._corrected = None

    def _check(self, array: np.ndarray, size: int, what: str) -> None:
        if array.dtype != self.dtype or array.size != size:
            raise ConfigError(f"PowerSGD {what}: expected {size} {self.dtype} values, got "
                              f"{array.size} {array.dtype}")


def orthonormal(matrix: np.ndarray) -> np.ndarray:
    """Columns that are orthonormal and span ``matrix``'s columns (reduced QR's Q)."""
    if not np.isfinite(matrix).all():
        return np.full_like(matrix, np.nan)
    q, _ = np.linalg.qr(matrix)
    return q.astype(matrix.dtype, copy=False)


def parse_powersgd(spec: str) -> int | None:
    """The rank of ``powersgd`` / ``powersgd:RANK``, or None for another name.

    Raises:
        ConfigError: ``powersgd:`` with something other than a positive integer.
    """
    name, _, argument = spec.strip().lower().partition(":")
    if name != "powersgd":
        return None
    if not argument:
        return DEFAULT_RANK
    try:
        rank = int(argument)
    except ValueError:
        raise ConfigError(f"PowerSGD rank must be an integer, got {argument!r}") from None
    if rank < 1:
        raise ConfigError(f"PowerSGD rank must be at least 1, got {rank}")
    return rank
