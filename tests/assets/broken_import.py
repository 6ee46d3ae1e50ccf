"""A user file that fails on import."""

raise ImportError("needs a package that is not installed: flash_attn")
