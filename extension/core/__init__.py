"""The method core: pure torch, no framework imports."""
