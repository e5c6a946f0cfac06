"""The frontend language: IR nodes, the interpreter, tracing and compilation. It knows backends only through the
interface in `radixflow.backends.base`, and imports none of them."""
