"""DP-SGD: Poisson sampling, clipping, noise, accounting and a private trainer."""
