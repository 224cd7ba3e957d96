"""Op-family kernel modules (NumPy only), copied verbatim into standalone generated modules."""
