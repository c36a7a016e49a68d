"""resprobe: probe trained residual networks (Jastrzębski et al., ICLR 2018, and beyond)."""

__version__ = "0.1.0"

# Nothing heavy is imported here: `import resprobe` (and so the command line's first moments) must not
# load torch. The modules that rebuild restructured checkpoints (share, ablate) register their recipes
# when models.apply_recipe first needs them.

# The Python API (DESIGN.md §2b), imported on first use: `import resprobe as rp; rp.align(model, loader)`.
# Some of its names are also modules of this package (resprobe/align.py, ...), which the import system
# binds on the package when they load; the functions win: `rp.align` is always the function, and the
# modules stay importable by their full names (`from resprobe.align import summarize`,
# `importlib.import_module("resprobe.align")`).
import sys as _sys
import types as _types

_API = frozenset({"blocks", "align", "ablate", "evaluate", "record", "open_recording", "share", "finetune", "save",
                  "load", "unwrap"})


class _Package(_types.ModuleType):
    def __getattribute__(self, name: str):
        if name in _API:  # PEP 562 alone would lose to an imported submodule of the same name
            from resprobe import api  # resprobe.api (and torch) load at the first rp.<function>

            return getattr(api, name)
        return super().__getattribute__(name)

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *_API})


_sys.modules[__name__].__class__ = _Package
