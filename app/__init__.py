"""quantserve: quantization as a service (API side; never imports torch)."""

__version__ = "0.1.0"
