"""Messages and stubs generated from proto/credbroker/v1 when the package is built."""
