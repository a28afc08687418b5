"""TensorRT plugins that earn their place by measurement (none yet: the standard-op blur is the default)."""
