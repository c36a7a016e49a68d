"""resprobe: probe trained residual networks (Jastrzębski et al., ICLR 2018, and beyond)."""

__version__ = "0.1.0"

# Recipe builders register on import so that models.load_model can rebuild restructured models from
# resprobe checkpoints. Imported after __version__, which resprobe.models reads while loading.
from resprobe import share as _share  # noqa: E402,F401  registers the "share" checkpoint recipe
from resprobe import ablate as _ablate  # noqa: E402,F401  registers the "prune" checkpoint recipe
