"""Budgets the reranker never exceeds, and the ledger that enforces them.

- `think`: tokens the model generates freely (its reasoning), summed over every window of a query;
- `inspect`: details inspections honoured (Retrv-R1), summed likewise;
- `tool`: tool calls honoured (V-Retrver);
- `token`: every token the decoder processes for the query: prompts, fed-back generated tokens, appended
  inspection/tool content, forced answer tokens. `None` means unlimited.

With several windows, each window may spend at most `remaining // windows_left` of each budget, so the windows
processed first (the tail of the coarse list) cannot starve the head.

The model's context is one more budget, per window (each window is its own decoder sequence): a window never
feeds more than `max_position_embeddings` tokens, and runs out of it the way it runs out of `token` (reported as
"context"). `fit_budget` caps the budgets to what the windows' contexts can ever hold and says which it capped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from retrv.runtime.errors import InputError
from retrv.runtime.limits import Cap, cap


# How many coarse candidates are reranked, and how (V-Retrver's sliding windows: 20 wide, stride 10, back to front).
DEFAULT_K = 50
DEFAULT_WINDOW = 20
DEFAULT_STRIDE = 10


@dataclass(frozen=True)
class Budget:
    think: int = 128  # Retrv-R1's reasoning length at evaluation; the card and the demo evaluate with it
    inspect: int = 3  # details inspections per query: each appends a candidate's full tokens
    tool: int = 3  # V-Retrver tool calls per query
    token: int | None = None

    def __post_init__(self) -> None:
        for name in ("think", "inspect", "tool"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InputError(f"budget.{name}: got {value!r}; expected an integer >= 0")
        if self.token is not None and (isinstance(self.token, bool) or not isinstance(self.token, int) or self.token < 1):
            raise InputError(f"budget.token: got {self.token!r}; expected an integer >= 1 or None")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Usage:
    think: int = 0
    inspect: int = 0
    tool: int = 0
    token: int = 0

    def add(self, other: "Usage") -> None:
        for k in ("think", "inspect", "tool", "token"):
            setattr(self, k, getattr(self, k) + getattr(other, k))


@dataclass
class WindowAllowance:
    """What one window may spend; `spent` is checked against it before every decoder call."""

    think: int
    inspect: int
    tool: int
    token: int | None
    context: int | None = None  # the model's context: the most tokens this window's decoder sequence may hold
    spent: Usage = field(default_factory=Usage)
    exhausted: set[str] = field(default_factory=set)

    def tokens_left(self) -> float:
        return min(self._left(self.token), self._left(self.context))

    def _left(self, limit: int | None) -> float:
        return float("inf") if limit is None else limit - self.spent.token

    def blocked(self, n: int, reserve: int = 0) -> str | None:
        """Which limit feeding `n` tokens (keeping `reserve` for the answer) would break: "context" (the model's),
        "token" (the query's budget), or None when they fit."""
        if n + reserve <= self.tokens_left():
            return None
        return "token" if self._left(self.token) < self._left(self.context) else "context"  # a tie: the context

    def can_feed(self, n: int, reserve: int = 0) -> bool:
        return self.blocked(n, reserve) is None

    def feed(self, n: int) -> None:
        if not self.can_feed(n):  # the loop checks first; reaching this is a bug, never a silent overrun
            raise AssertionError(f"token budget overrun: feeding {n} with {self.tokens_left()} left")
        self.spent.token += n


class Ledger:
    """Per-query budget accounting across windows."""

    def __init__(self, budget: Budget, windows: int, context: int | None = None) -> None:
        if windows < 1:
            raise InputError(f"windows: got {windows}; expected >= 1")
        self.budget, self.context = budget, context
        self.windows_left = windows
        self.used = Usage()
        self.exhausted: set[str] = set()

    def _share(self, total: int | None, used: int) -> int | None:
        if total is None:
            return None
        return max(0, total - used) // self.windows_left

    def next_window(self) -> WindowAllowance:
        b, u = self.budget, self.used
        return WindowAllowance(
            think=self._share(b.think, u.think),
            inspect=self._share(b.inspect, u.inspect),
            tool=self._share(b.tool, u.tool),
            token=self._share(b.token, u.token),
            context=self.context,
        )

    def close_window(self, allowance: WindowAllowance) -> None:
        self.used.add(allowance.spent)
        self.exhausted |= allowance.exhausted
        self.windows_left -= 1


def fit_budget(budget: Budget, context: int, window_sizes: list[int]) -> tuple[Budget, dict[str, Cap]]:
    """Cap each budget to what the windows can ever spend: per window, at most `context` tokens fed (so at most
    that many think tokens, tool calls or tokens) and one inspection per candidate. -> (the budget to run, the caps
    by budget name, empty when nothing was capped)."""
    windows = len(window_sizes)
    room = context * windows
    per = f"context {context} tokens x {windows} window{'s' if windows > 1 else ''}"
    ceilings = {
        "think": (room, per),
        "inspect": (sum(window_sizes), f"one inspection per candidate per window: {sum(window_sizes)} in all"),
        "tool": (room, per),
        "token": (room, per),
    }
    values, caps = {}, {}
    for name, (ceiling, reason) in ceilings.items():
        asked = getattr(budget, name)
        if asked is None:
            continue
        values[name], c = cap(asked, ceiling, reason)
        if c is not None:
            caps[name] = c
    return (replace(budget, **values) if caps else budget), caps
