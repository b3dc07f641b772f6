"""HTML reports with matplotlib plots embedded as PNG (self-contained files)."""
