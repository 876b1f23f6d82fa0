"""``python -m free_kernels``: same as ``python -m free_kernels.info``."""
import sys

from .info import main

sys.exit(main())
