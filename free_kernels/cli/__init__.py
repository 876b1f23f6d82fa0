"""Console scripts of free_kernels (``free-sample``: :mod:`free_kernels.cli.sample`)."""
