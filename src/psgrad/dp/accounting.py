"""Privacy accounting with Google's ``dp_accounting``: RDP or PLD over Poisson-subsampled Gaussian steps.

Every DP-SGD step is the event ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))``: each example is in the
batch with probability q, and the clipped sum gets Gaussian noise of std sigma times its sensitivity.
:class:`Accountant` keeps the history as a list of ``(q, sigma, steps)`` (consecutive equal events merged),
which is all a checkpoint needs: ``epsilon`` rebuilds a ``dp_accounting`` accountant from it and composes
each event ``steps`` times. The neighbouring relation is dp_accounting's default, add-or-remove one example.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import MissingDependencyError, PsgradError

METHODS = ("rdp", "pld")


class _QuietNonConvergence(logging.Filter):
    """Drops dp_accounting's warning that an RDP order did not converge.

    The RDP accountant then leaves that order out of the minimum over orders, so the epsilon it reports is
    still a valid upper bound (from the other orders); at small q and sigma it warns once per fractional order
    and call, dozens of times during a noise-multiplier search.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


_QUIET = _QuietNonConvergence()


def _dp_accounting():
    absl = logging.getLogger("absl")
    if _QUIET not in absl.filters:
        absl.addFilter(_QUIET)
    try:
        import dp_accounting
        import dp_accounting.pld  # noqa: F401
        import dp_accounting.rdp  # noqa: F401
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise MissingDependencyError(
            "psgrad.dp accounting needs the optional dependency 'dp_accounting'; install it with: "
            "pip install 'psgrad[dp]'"
        ) from exc
    return dp_accounting


def check_delta(delta: Any, where: str) -> float:
    """``delta`` as a float in (0, 1), or a PsgradError naming ``where``."""
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise PsgradError(f"{where}: delta must be in (0, 1), got {delta!r}; a usual choice is below 1 / dataset size")
    return float(delta)


def check_noise_multiplier(sigma: Any, where: str) -> float:
    """``sigma`` as a positive finite float, or a PsgradError naming ``where``."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (math.isfinite(sigma) and sigma > 0):
        raise PsgradError(
            f"{where}: noise_multiplier must be a positive finite number, got {sigma!r}; "
            "derive one from a target epsilon with noise_multiplier_for(...)"
        )
    return float(sigma)


def check_method(method: Any, where: str) -> str:
    if method not in METHODS:
        raise PsgradError(f"{where}: unknown accountant {method!r}; valid: {', '.join(METHODS)}")
    return method


def dp_event(sample_rate: float, noise_multiplier: float, steps: int = 1) -> Any:
    """The ``dp_accounting`` event of ``steps`` DP-SGD steps with Poisson rate q and noise multiplier sigma.

    Args:
        sample_rate (float): q in (0, 1].
        noise_multiplier (float): sigma > 0.
        steps (int): how many times the step is composed. Default: 1.

    Returns:
        ``dp_accounting.SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps)``.

    Example::

        >>> accountant = dp_accounting.rdp.RdpAccountant().compose(dp_event(0.01, 1.1, 1000))
    """
    dpa = _dp_accounting()
    step = dpa.PoissonSampledDpEvent(sample_rate, dpa.GaussianDpEvent(noise_multiplier))
    return dpa.SelfComposedDpEvent(step, steps)


class Accountant:
    """The privacy spent by DP-SGD so far, computed by ``dp_accounting`` (RDP or PLD).

    Args:
        method (str): ``"rdp"`` (``dp_accounting.rdp.RdpAccountant``, default orders) or ``"pld"``
            (``dp_accounting.pld.PLDAccountant``, tighter, slower). Default: ``"rdp"``.
        history (Iterable, optional): ``(q, sigma, steps)`` triples to start from (e.g. from a checkpoint).

    Example::

        >>> acc = Accountant("rdp")
        >>> acc.step(sample_rate=0.01, noise_multiplier=1.1, steps=1000)
        >>> acc.epsilon(delta=1e-5)  # a float
    """

    def __init__(self, method: str = "rdp", history: Iterable[tuple[float, float, int]] = ()) -> None:
        self.method = check_method(method, "Accountant")
        self._history: list[tuple[float, float, int]] = []
        self._cache: dict[tuple, float] = {}
        for q, sigma, steps in history:
            self.step(q, sigma, steps)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """``[(q, sigma, steps), ...]``: consecutive steps with equal q and sigma merged."""
        return list(self._history)

    @property
    def steps(self) -> int:
        """The number of DP-SGD steps accounted so far (empty batches included)."""
        return sum(s for _, _, s in self._history)

    def step(self, sample_rate: float, noise_multiplier: float, steps: int = 1) -> None:
        """Account ``steps`` more DP-SGD steps with Poisson rate q and noise multiplier sigma."""
        from .sampling import check_sample_rate

        where = "Accountant.step"
        q = check_sample_rate(sample_rate, where)
        sigma = check_noise_multiplier(noise_multiplier, where)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise PsgradError(f"{where}: steps must be a non-negative int, got {steps!r}")
        if steps == 0:
            return
        if self._history and self._history[-1][:2] == (q, sigma):
            self._history[-1] = (q, sigma, self._history[-1][2] + steps)
        else:
            self._history.append((q, sigma, steps))

    def dp_accountant(self) -> Any:
        """A fresh ``dp_accounting`` accountant that has composed the whole history."""
        dpa = _dp_accounting()
        accountant = dpa.rdp.RdpAccountant() if self.method == "rdp" else dpa.pld.PLDAccountant()
        for q, sigma, steps in self._history:
            accountant.compose(dp_event(q, sigma, steps))
        return accountant

    def epsilon(self, delta: float) -> float:
        """The epsilon of the steps so far at this delta (0.0 before any step).

        Args:
            delta (float): in (0, 1).

        Returns:
            float: epsilon such that the run so far is (epsilon, delta)-DP.
        """
        delta = check_delta(delta, "Accountant.epsilon")
        if not self._history:
            return 0.0
        key = (tuple(self._history), delta)
        if key not in self._cache:
            self._cache = {key: float(self.dp_accountant().get_epsilon(delta))}
        return self._cache[key]

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.method, "history": [list(e) for e in self._history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("method") != self.method:
            raise PsgradError(
                f"Accountant.load_state_dict: the checkpoint was accounted with {state.get('method')!r}, this "
                f"accountant uses {self.method!r}; resume with the same method"
            )
        self._history = []
        for q, sigma, steps in state["history"]:
            self.step(float(q), float(sigma), int(steps))


def epsilon_for(sample_rate: float, noise_multiplier: float, steps: int, delta: float, method: str = "rdp") -> float:
    """Epsilon of ``steps`` DP-SGD steps with Poisson rate q and noise multiplier sigma, at this delta.

    Example::

        >>> epsilon_for(0.01, 1.0, 1000, 1e-5)  # a float
    """
    acc = Accountant(method)
    acc.step(sample_rate, noise_multiplier, steps)
    return acc.epsilon(delta)


_SIGMA_LOW, _SIGMA_HIGH = 0.05, 5000.0  # the search interval of noise_multiplier_for


def noise_multiplier_for(
    target_epsilon: float,
    *,
    sample_rate: float,
    steps: int,
    delta: float,
    method: str = "rdp",
    rtol: float = 1e-3,
) -> float:
    """The smallest noise multiplier (to a relative ``rtol``) whose run stays within ``target_epsilon``.

    Bisection over sigma in log space between 0.05 and 5000, each point accounted by ``dp_accounting``:
    epsilon decreases as sigma grows. The value returned is the upper end of the final interval, so its
    epsilon is at most the target (a target met already at sigma = 0.05 returns 0.05).

    Args:
        target_epsilon (float): the privacy budget, > 0.
        sample_rate (float): Poisson rate q in (0, 1].
        steps (int): the number of DP-SGD steps of the run (> 0).
        delta (float): in (0, 1).
        method (str): ``"rdp"`` or ``"pld"``. Default: ``"rdp"``.
        rtol (float): relative precision of sigma. Default: 1e-3.

    Returns:
        float: sigma with ``epsilon_for(q, sigma, steps, delta) <= target_epsilon``.

    Raises:
        PsgradError: a bad argument, or a target that no sigma up to 5000 reaches (RDP's conversion has a
            floor of about log(1/delta)/(max order - 1) whatever sigma is).

    Example::

        >>> sigma = noise_multiplier_for(8.0, sample_rate=128 / 1437, steps=400, delta=1e-5)
    """
    from .sampling import check_sample_rate

    where = "noise_multiplier_for"
    if (isinstance(target_epsilon, bool) or not isinstance(target_epsilon, (int, float))
            or not (math.isfinite(target_epsilon) and target_epsilon > 0)):
        raise PsgradError(f"{where}: target_epsilon must be a positive finite number, got {target_epsilon!r}")
    q = check_sample_rate(sample_rate, where)
    delta = check_delta(delta, where)
    method = check_method(method, where)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise PsgradError(f"{where}: steps must be a positive int, got {steps!r}")
    if not 0 < rtol < 1:
        raise PsgradError(f"{where}: rtol must be in (0, 1), got {rtol!r}")

    seen: dict[float, float] = {}

    def eps(sigma: float) -> float:
        if sigma not in seen:
            seen[sigma] = epsilon_for(q, sigma, steps, delta, method)
        return seen[sigma]

    # Bracket geometrically from sigma = 1: small sigmas are the costly points (PLD above all), so only
    # go down as far as needed.
    if eps(1.0) > target_epsilon:
        lo, hi = 1.0, 4.0
        while eps(hi) > target_epsilon:
            if hi >= _SIGMA_HIGH:
                raise PsgradError(
                    f"{where}: target epsilon {target_epsilon} is unreachable with q={q}, {steps} steps, "
                    f"delta={delta} and the {method} accountant: even noise_multiplier={hi:g} gives epsilon "
                    f"{eps(hi):.4g}; raise the target, lower the sample rate or the number of steps, or raise delta"
                )
            lo, hi = hi, min(4 * hi, _SIGMA_HIGH)
    else:
        lo, hi = 0.5, 1.0
        while eps(lo) <= target_epsilon:
            if lo <= _SIGMA_LOW:
                return lo
            lo, hi = max(lo / 2, _SIGMA_LOW), lo
    # Invariant: eps(lo) > target >= eps(hi).
    while hi / lo > 1 + rtol:
        mid = math.sqrt(lo * hi)
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi
