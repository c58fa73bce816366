"""What the llama.cpp target's writers raise (a leaf module: the GGUF writer and its vocabulary both raise it)."""


class UnsupportedForGGUF(ValueError):
    """The model (architecture, rotary scaling, tokenizer) cannot be written as a GGUF llama.cpp serves."""
