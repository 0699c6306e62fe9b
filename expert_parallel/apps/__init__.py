"""Layer 6, programs built on the library: the ``expert-parallel`` command (``cli``), the demo, the
language-model example (``lm``, ``train``, ``compare``, ``plots``) and the benchmark (``bench``).

The library needs torch only; the programs also need numpy, tqdm and matplotlib, the ``apps`` extra
(``pip install "expert-parallel[apps]"``).
"""

import importlib.util


def _missing(name: str) -> bool:
    # find_spec looks the package up without importing it: importing matplotlib here would load its
    # extension modules into every program, the benchmark's allocator measurements included.
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules
        return True


_MISSING = [name for name in ("numpy", "tqdm", "matplotlib") if _missing(name)]
if _MISSING:
    raise ImportError(f"expert_parallel.apps needs {', '.join(_MISSING)}, which cannot be imported: "
                      "install the programs' extra with pip install \"expert-parallel[apps]\"")
