"""Loads the compiled extension ``dpsat_fast._C``, which registers the ``torch.ops.dpsat_fast`` ops.

The extension is optional: without it every op runs its pure-PyTorch reference (much slower), and
a single warning says so and how to build it. ``DPSAT_FAST_DISABLE_EXT=1`` skips loading it, so
tests can exercise the pure path in a process where the extension is installed.
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch  # noqa: F401  (loads libtorch before the extension that links against it)

__all__ = ["EXTENSION_AVAILABLE", "DISABLE_ENV_VAR", "load_error"]

DISABLE_ENV_VAR = "DPSAT_FAST_DISABLE_EXT"
BUILD_HINT = "pip install --no-build-isolation -e ."

load_error: str | None = None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


def _load_extension() -> bool:
    global load_error
    if _env_flag(DISABLE_ENV_VAR):
        load_error = f"disabled by {DISABLE_ENV_VAR}"
        return False
    try:
        importlib.import_module("dpsat_fast._C")
    except ImportError as exc:
        load_error = str(exc)
        warnings.warn(
            f"dpsat_fast: the compiled extension dpsat_fast._C could not be loaded ({exc}); "
            "using the pure-PyTorch reference ops, which are much slower. Build it from the "
            f"repository root with `{BUILD_HINT}`.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


EXTENSION_AVAILABLE: bool = _load_extension()
