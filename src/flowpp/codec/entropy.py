"""The entropy coder: constriction's stack ANS with the few models bits-back coding needs.

Values are integers on a grid (``k`` stands for ``k * 2**-grid_bits``). A Gaussian over them is
coded in two levels when it is wide: a quantized Gaussian over coarse bins of ``m`` grid steps
(``m`` a power of two, chosen so that the coarse standard deviation is at most ``COARSE_STD``),
then the position inside the bin, uniformly. constriction's models have 24-bit probabilities
and give every symbol of their support at least one count, so a support of ``n`` symbols costs
about ``n / 2**24`` nats per symbol; coarse bins keep the support small (``2 * WINDOW + 1``)
whatever the width of the Gaussian. The uniform part is exact for a power-of-two ``m``.

A coarse bin at the edge of the window is an escape: the distance beyond it follows (its bit
length under a geometric law, then the bits), so a value far in a tail is still coded, at a cost
that grows with the log of its distance, instead of failing. Under that law a decode that lands
on an escape (probability about 2**-23 per value, from the models' minimum probability) goes
only a few coarse bins beyond the window, never astronomically far.
"""

from __future__ import annotations

import numpy as np

from ..errors import FlowppError

__all__ = ["CodecError", "StackCoder", "COARSE_STD", "WINDOW"]

COARSE_STD = 32.0
# Coarse bins either side of the mean: the first of these at least WINDOW_STDS coarse standard
# deviations. Each symbol of the window has probability at least 2**-24, so a wider window
# would be drawn from its far tail (at a loss of tens of bits) far more often than a Gaussian is.
WINDOWS = (8, 16, 32, 48, 64, 96, 128, 192)
WINDOW_STDS = 6.0
WINDOW = WINDOWS[-1]
_ESCAPE_BITS = 23
_MAX_LEVEL_BITS = 23  # constriction's uniform model holds fewer than 2**24 symbols
_WIDE_BITS = 20  # uniform sizes above 2**23 are coded as a low part of 20 bits and a high part


class CodecError(FlowppError, ValueError):
    """An image cannot be coded, or an archive cannot be decoded exactly."""


def _constriction():
    try:
        import constriction
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise CodecError("compression needs the constriction package: pip install constriction") from e
    return constriction


class StackCoder:
    """A stack (last in, first out) of coded integers over constriction's ``AnsCoder``.

    ``push_*`` encodes onto the stack, ``pop_*`` decodes from it; a pop undone by the matching
    push restores the stack bit for bit. ``low_water`` is the fewest bits the stack held after
    any pop: what bits-back decoding has borrowed.
    """

    def __init__(self, words: np.ndarray | None = None):
        c = _constriction()
        self._ans = (
            c.stream.stack.AnsCoder() if words is None else c.stream.stack.AnsCoder(np.asarray(words, np.uint32))
        )
        self._families: dict[int, object] = {}
        self._uniform = c.stream.model.Uniform()
        self._excess_bits = c.stream.model.Categorical(_EXCESS_BIT_PROBABILITIES, perfect=False)
        self.low_water = self.num_bits()

    def restore(self, words: np.ndarray) -> None:
        """Return to the state that ``words()`` returned (undoing what was coded since)."""
        self._ans = _constriction().stream.stack.AnsCoder(np.asarray(words, np.uint32))
        self.low_water = self.num_bits()

    def num_bits(self) -> int:
        return int(self._ans.num_valid_bits())

    def words(self) -> np.ndarray:
        return np.asarray(self._ans.get_compressed(), dtype=np.uint32)

    def _after_pop(self) -> None:
        self.low_water = min(self.low_water, self.num_bits())

    # --- uniform integers in [0, size) -------------------------------------------------------

    def push_uniform(self, values: np.ndarray, sizes: np.ndarray) -> None:
        values, sizes = _flat(values, np.int64), _flat(sizes, np.int64)
        if sizes.size == 0 or sizes.max() < 2:  # nothing to code: every value is 0
            return
        wide = sizes > (1 << _MAX_LEVEL_BITS)
        narrow = ~wide & (sizes >= 2)
        # Pushed in the reverse of the order pop reads them: wide low parts, wide high parts, narrow.
        if wide.any():
            low = values[wide] & ((1 << _WIDE_BITS) - 1)
            self._ans.encode_reverse(low.astype(np.int32), self._uniform, np.full(low.size, 1 << _WIDE_BITS, np.int32))
            high_sizes = -(-sizes[wide] // (1 << _WIDE_BITS))
            self._ans.encode_reverse(
                (values[wide] >> _WIDE_BITS).astype(np.int32), self._uniform, high_sizes.astype(np.int32)
            )
        if narrow.any():
            self._ans.encode_reverse(values[narrow].astype(np.int32), self._uniform, sizes[narrow].astype(np.int32))

    def pop_uniform(self, sizes: np.ndarray) -> np.ndarray:
        sizes = _flat(sizes, np.int64)
        out = np.zeros(sizes.size, np.int64)
        if sizes.size == 0 or sizes.max() < 2:
            return out
        wide = sizes > (1 << _MAX_LEVEL_BITS)
        narrow = ~wide & (sizes >= 2)
        if narrow.any():
            out[narrow] = self._ans.decode(self._uniform, sizes[narrow].astype(np.int32))
        if wide.any():
            high_sizes = -(-sizes[wide] // (1 << _WIDE_BITS))
            high = self._ans.decode(self._uniform, high_sizes.astype(np.int32)).astype(np.int64)
            low = self._ans.decode(self._uniform, np.full(high.size, 1 << _WIDE_BITS, np.int32)).astype(np.int64)
            out[wide] = (high << _WIDE_BITS) | low
        self._after_pop()
        return out

    # --- Gaussians over the grid -------------------------------------------------------------

    def push_gaussian(self, values: np.ndarray, mean: np.ndarray, std: np.ndarray) -> None:
        """Encode integers ``values`` under N(mean, std^2) quantized to unit bins (grid units)."""
        values = _flat(values, np.int64)
        centre, step, coarse_mean, coarse_std = _levels(_flat(mean, np.float64), _flat(std, np.float64), values.size)
        groups, window = _groups(coarse_std)
        rest = values - centre
        if step is None:  # bins of one grid step: nothing below the coarse level
            coarse = rest
        else:
            coarse = rest // step  # floor division: the coarse bin, also for negative offsets
            self.push_uniform(rest - coarse * step, step)
        escaped = np.abs(coarse) >= window
        if escaped.any():
            excess = np.abs(coarse[escaped]) - (window[escaped] if np.ndim(window) else window)
            if int(excess.max()) >= (1 << _ESCAPE_BITS):
                raise CodecError(
                    "a value lies too far from its coding distribution to be coded (over 2**23 coarse bins)"
                )
            self._push_excess(excess)
            coarse = np.clip(coarse, -window, window)
        symbols = coarse.astype(np.int32)
        for w, members in groups:
            self._ans.encode_reverse(symbols[members], self._gauss(w), coarse_mean[members], coarse_std[members])

    def pop_gaussian(self, mean: np.ndarray, std: np.ndarray, count: int | None = None) -> np.ndarray:
        """Decode integers under N(mean, std^2) (``mean``/``std`` may be scalars with ``count``)."""
        n = count if count is not None else np.size(mean)
        centre, step, coarse_mean, coarse_std = _levels(_flat(mean, np.float64), _flat(std, np.float64), n)
        groups, window = _groups(coarse_std)
        if len(groups) == 1:
            coarse = self._ans.decode(self._gauss(groups[0][0]), coarse_mean, coarse_std).astype(np.int64)
        else:
            coarse = np.empty(n, np.int64)
            for w, members in reversed(groups):
                coarse[members] = self._ans.decode(self._gauss(w), coarse_mean[members], coarse_std[members])
        escaped = np.abs(coarse) >= window
        if escaped.any():
            coarse[escaped] += np.sign(coarse[escaped]) * self._pop_excess(int(escaped.sum()))
        out = centre + coarse if step is None else centre + coarse * step + self.pop_uniform(step)
        self._after_pop()
        return out

    def _gauss(self, window: int):
        if window not in self._families:
            self._families[window] = _constriction().stream.model.QuantizedGaussian(-window, window)
        return self._families[window]

    def _push_excess(self, excess: np.ndarray) -> None:
        """Distances beyond the window: bit length b (0 for 0), then the b - 1 bits below the top one."""
        bits = np.zeros(excess.size, np.int64)
        nonzero = excess > 0
        bits[nonzero] = np.floor(np.log2(excess[nonzero])).astype(np.int64) + 1  # exact below 2**53
        low = excess - np.where(bits > 0, 1 << np.maximum(bits - 1, 0), 0)
        self.push_uniform(low, np.where(bits > 1, 1 << np.maximum(bits - 1, 0), 1))
        self._ans.encode_reverse(bits.astype(np.int32), self._excess_bits)

    def _pop_excess(self, count: int) -> np.ndarray:
        bits = self._ans.decode(self._excess_bits, count).astype(np.int64)
        top = np.where(bits > 0, 1 << np.maximum(bits - 1, 0), 0)
        return top + self.pop_uniform(np.where(bits > 1, 1 << np.maximum(bits - 1, 0), 1))


# P(bit length b) proportional to 4**-b: a decoded escape lands a few coarse bins out.
_EXCESS_BIT_PROBABILITIES = np.array([4.0**-b for b in range(_ESCAPE_BITS + 1)]) / sum(
    4.0**-b for b in range(_ESCAPE_BITS + 1)
)


_LADDER = np.asarray(WINDOWS, np.int64)


def _groups(coarse_std: np.ndarray) -> tuple[list, np.ndarray | int]:
    """Each value's window (the first of the ladder at least WINDOW_STDS coarse standard
    deviations), and (window, members) for each window in use, in increasing order; members is
    a slice when one window serves all (the common case: no gathering)."""
    index = np.searchsorted(_LADDER, np.ceil(WINDOW_STDS * coarse_std), side="left")
    np.minimum(index, _LADDER.size - 1, out=index)
    if index.size == 0:
        return [], 0
    first, last = int(index.min()), int(index.max())
    if first == last:
        return [(int(_LADDER[first]), slice(None))], int(_LADDER[first])
    counts = np.bincount(index, minlength=_LADDER.size)
    groups = [(int(_LADDER[i]), np.flatnonzero(index == i)) for i in range(first, last + 1) if counts[i]]
    return groups, _LADDER[index]


def _flat(a, dtype) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=dtype).reshape(-1))


def _levels(mean: np.ndarray, std: np.ndarray, n: int):
    """Centre (an integer near the mean), coarse bin size (a power of two; None for bins of one
    step), and the coarse Gaussian's mean and standard deviation in coarse bins, for each value."""
    mean = np.broadcast_to(mean, (n,)) if mean.size == 1 else mean
    std = np.broadcast_to(std, (n,)) if std.size == 1 else std
    if n and not (np.isfinite(mean).all() and np.isfinite(std).all() and std.min() > 0):
        raise CodecError("the coding distribution has a non-finite mean or a non-positive spread")
    centre = np.floor(mean).astype(np.int64)
    # Coarse bin h holds grid values centre + h*step .. centre + h*step + step - 1, i.e. the
    # continuous interval [h*step - 0.5, (h+1)*step - 0.5) around the centre.
    if n == 0 or std.max() <= COARSE_STD:
        return centre, None, np.ascontiguousarray(mean - centre), np.ascontiguousarray(std)
    exponent = np.clip(np.ceil(np.log2(std / COARSE_STD)), 0, _MAX_LEVEL_BITS).astype(np.int64)
    step = np.left_shift(np.int64(1), exponent)
    coarse_mean = np.ascontiguousarray((mean - centre + 0.5) / step - 0.5, dtype=np.float64)
    coarse_std = np.ascontiguousarray(std / step, dtype=np.float64)
    return centre, step, coarse_mean, coarse_std
