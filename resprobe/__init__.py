"""resprobe: probe trained residual networks (Jastrzębski et al., ICLR 2018, and beyond)."""

import os as _os

# resprobe never downloads weights: every hub lookup must come from the local cache.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"
