"""Constructor-argument checks: each error names the argument and what is allowed."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, TypeVar, cast

#: One of a validated choice's values: a plain str, or a Literal when ``allowed`` is typed so.
_Choice = TypeVar("_Choice", bound=str)


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int{_min(minimum)}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an int{_min(minimum)}, got {value!r}")
    return value


def _min(minimum: int | None) -> str:
    return "" if minimum is None else f" >= {minimum}"


def check_positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite float, got {value!r}")
    return float(value)


def check_seconds(name: str, value: Any) -> float:
    """A positive duration in seconds; ``math.inf`` (never) is allowed."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isnan(value):
        raise ValueError(f"{name} must be a positive number of seconds (math.inf: never), got {value!r}")
    return float(value)


def check_optional_positive_float(name: str, value: Any) -> float | None:
    """None (off) or a positive finite float."""
    if value is None:
        return None
    try:
        return check_positive_float(name, value)
    except ValueError:
        raise ValueError(f"{name} must be None (off) or a positive finite float, got {value!r}") from None


def check_bool(name: str, value: Any, *, extra: str = "") -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False{' ' + extra if extra else ''}, got {value!r}")
    return value


def check_choice(name: str, value: Any, allowed: Sequence[_Choice], *, extra: str = "") -> _Choice:
    if not isinstance(value, str) or value not in allowed:
        options = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name} must be one of {options}{' ' + extra if extra else ''}; got {value!r}")
    return cast(_Choice, value)  # one of ``allowed``, which isinstance cannot narrow to


def check_patterns(name: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name} must be None or a list of glob patterns (str) over module names, got {value!r}")
    if not value:
        raise ValueError(f"{name} must be None or a non-empty list of glob patterns, got an empty list")
    return list(value)


def check_callable(name: str, value: Any, what: str) -> Any:
    """None or a callable; ``what`` says what it must be (e.g. ``"callable(batch) -> int"``)."""
    if value is not None and not callable(value):
        raise ValueError(f"{name} must be None or a {what}, got {value!r}")
    return value


_TAG_ROOT = re.compile(r"[A-Za-z0-9_.\-]+")


def check_tag_root(name: str, value: Any) -> str:
    """A callback's ``name``: the first field of every tag it writes (no ``/``)."""
    if not isinstance(value, str) or not _TAG_ROOT.fullmatch(value):
        raise ValueError(
            f"{name} must be a non-empty string of letters, digits, '_', '.' or '-' (the root of every tag "
            f"the callback writes, e.g. 'lca_val'), got {value!r}"
        )
    return value


def check_unique_tag_roots(trainer: Any, callback: Any) -> None:
    """Fail when another learnscope callback in ``trainer`` writes under the same ``name``."""
    for other in getattr(trainer, "callbacks", []):
        if other is callback or not hasattr(other, "tag_root"):
            continue
        if other.tag_root == callback.tag_root:
            raise ValueError(
                f"{type(callback).__name__}(name={callback.tag_root!r}) and {type(other).__name__}"
                f"(name={other.tag_root!r}) in one Trainer would write the same tags: give each a distinct "
                f"name= (e.g. name={callback.tag_root + '_val'!r})"
            )


def check_alphas(name: str, value: Any) -> tuple[float, ...]:
    """The NFA exponents α of AGOP^α: a non-empty list (or tuple) of positive finite
    floats; returns the distinct ones, in the order given."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{name} must be a non-empty list of positive finite floats (e.g. [1.0, 0.5]), got {value!r}")
    return tuple(dict.fromkeys(check_positive_float(f"each of {name}", alpha) for alpha in value))


def check_probe_options(
    probe: Any, probe_size: Any, probe_batch_size: Any, allowed: Sequence[str]
) -> tuple[Any, int | None, int]:
    """A callback's probe-set arguments: ``probe`` (one of ``allowed`` or a DataLoader),
    ``probe_size`` (None: all, or an int >= 1) and ``probe_batch_size`` (an int >= 1)."""
    # imported here, not above: this module imports no torch
    from torch.utils.data import DataLoader

    if not isinstance(probe, DataLoader):
        check_choice("probe", probe, allowed, extra="or a torch.utils.data.DataLoader")
    size = None if probe_size is None else check_int("probe_size", probe_size, minimum=1)
    return probe, size, check_int("probe_batch_size", probe_batch_size, minimum=1)
