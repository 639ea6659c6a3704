"""CPU memory helpers: large result buffers and kept scratch blocks (``alloc``), streaming writes of large
per-sample products (``stream``, with the optional C extension ``_cstream``). Used by the engines and rules;
nothing here knows about either."""
