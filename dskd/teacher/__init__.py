"""The teacher layer: the frozen teacher online (``online``) or its outputs read from a cache
written once (``cache`` for the format and the writer, ``cache_reader`` for the reader)."""
