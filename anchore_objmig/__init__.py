"""anchore-objmig: move Anchore object-store documents between backends."""

__version__ = "0.1.0"
