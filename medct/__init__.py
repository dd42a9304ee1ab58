"""medct: CT foundation models on MONAI, PyTorch and Lightning.

`import medct` is cheap: the notebook API (read_volume, load_model, segment, ...) is resolved
lazily, so the CLI dispatcher starts without importing torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it; imported on first attribute access (PEP 562).
_LAZY = {
    "Volume": "medct.volume",
    "read_volume": "medct.io",
    "write_volume": "medct.io",
    "read_rtstruct": "medct.dicom",
    "load_model": "medct.api",
    "segment": "medct.api",
    "register": "medct.api",
    "synthesize_ct": "medct.api",
    "generate": "medct.api",
    "predict_motion": "medct.api",
    "MedCTError": "medct.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'medct' has no attribute {name!r}")
