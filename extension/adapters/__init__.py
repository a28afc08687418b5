"""Adapters that translate a framework's modules and batches into the core's terms."""
