"""The table of test-time adaptation methods that `medct segment --adapt NAME` can run.

The segment runner (core) adapts a copy of the model on each case through whatever is registered
here under NAME; it never imports a method. `medct.finetune.tta` registers tent, cotta and psmt
when it is imported (the `segment` command imports it); a new method registers itself the same
way, from any module or a test file:

    >>> from medct.adaptation import AdaptOptions, register_adaptation
    >>> register_adaptation("mine", lambda source, options: MyAdapter(source, options))

An adapter is made once per folder run from the source network (float32, CPU, unfolded batch
norm) and the run's `AdaptOptions`; before each case it returns the network that segments that
case and the columns it adds to summary.csv.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from medct.errors import ConfigError

ResetMode = Literal["case", "never"]

# the summary.csv columns an adapter's report may fill, in this order (medct.runner writes them)
ADAPT_COLUMNS = ("adapt", "adapt_steps", "adapt_seconds", "adapt_peak_mb", "adapt_loss", "adapt_reverted")


@dataclass(frozen=True)
class AdaptOptions:
    """How a folder run adapts: the method's name, steps per case, patches per step (`batch`),
    the model's patch size, reset to the source per case or never (continual along the folder),
    the device, the seed of the patch draws and the precision of the adaptation's forward passes
    (bf16 or fp32, as the predictor resolved it: `medct.precision`; losses, EMA teachers and
    Fisher sums stay float32)."""

    method: str
    patch_size: tuple[int, int, int]
    steps: int = 10
    batch: int = 2
    reset: ResetMode = "case"
    device: str = "cpu"
    seed: int = 0
    precision: Literal["bf16", "fp32"] = "fp32"


class AdaptReport(Protocol):
    """What an adapter reports of one case: its summary.csv columns (keys from ADAPT_COLUMNS)."""

    def row(self) -> Mapping[str, str]: ...


class CaseAdapter(Protocol):
    """Adapts the source network to one case before it is segmented."""

    def adapt(self, x: object, body: object | None) -> tuple[object, AdaptReport]:
        """x: the case's network input (1, 1, X, Y, Z) float32 tensor; body: its `BodyMask` on the
        network grid or None. Returns the `nn.Module` that segments the case and the report."""
        ...


AdapterFactory = Callable[[object, AdaptOptions], CaseAdapter]  # (source nn.Module, options) -> adapter

ADAPTATION_METHODS: dict[str, AdapterFactory] = {}


def register_adaptation(name: str, factory: AdapterFactory) -> None:
    """Make `medct segment --adapt NAME` build its adapter with `factory(source, options)`."""
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"an adaptation method name is letters, digits, '-' and '_', got {name!r}")
    ADAPTATION_METHODS[name] = factory


def make_adapter(source: object, options: AdaptOptions) -> CaseAdapter:
    """The adapter of `options.method` from the table; one sentence when no method has that name."""
    factory = ADAPTATION_METHODS.get(options.method)
    if factory is None:
        known = (
            ", ".join(sorted(ADAPTATION_METHODS)) or "none (import medct.finetune.tta to register tent, cotta, psmt)"
        )
        raise ConfigError(f"--adapt '{options.method}' is not an adaptation method; registered: {known}.")
    if options.steps < 1:
        raise ConfigError(f"--adapt-steps must be at least 1, got {options.steps}.")
    if options.reset not in ("case", "never"):
        raise ConfigError(f"--adapt-reset must be case or never, got '{options.reset}'.")
    return factory(source, options)
