"""resprobe: probe trained residual networks (Jastrzębski et al., ICLR 2018, and beyond)."""

__version__ = "0.1.0"

# Nothing heavy is imported here: `import resprobe` (and so the command line's first moments) must not
# load torch. The modules that rebuild restructured checkpoints (share, ablate) register their recipes
# when models.apply_recipe first needs them.
