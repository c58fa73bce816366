"""Storage schemes, one module each; importing this package registers them (see base for the contract), and a
package of your own registers more through the `planner.storage_schemes` entry-point group."""
from search_spaces.quantization.schemes.base import (STORAGE_SCHEMES, Layout, QuantizedWeight, StorageGrid,
                                                    StorageScheme, register_scheme, scheme_named)
from search_spaces.quantization.schemes import compressed_tensors, gguf  # noqa: E402,F401  (registers them)

__all__ = ["STORAGE_SCHEMES", "Layout", "QuantizedWeight", "StorageGrid", "StorageScheme", "register_scheme",
           "scheme_named"]
