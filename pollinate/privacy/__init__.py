"""Client-level differential privacy: clipping and Gaussian noise on updates (``mechanism``, torch),
central or local, and the (ε, δ) they cost (``accountant``, from ``dp-accounting``). Settings: the
``[dp]`` table (``settings``, standard library: this package imports nothing heavy by itself)."""
