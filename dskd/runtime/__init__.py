"""Process-level runtime: launcher detection and the process group (below every other layer but config)."""
