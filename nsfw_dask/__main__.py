"""``python -m nsfw_dask``: the ``nsfw-dask`` command."""

import sys

from .cli import main

sys.exit(main())
