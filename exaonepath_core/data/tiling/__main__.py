"""Run the tiling CLI as `python -m exaonepath_core.data.tiling` (see `cli.main`)."""
import sys

from exaonepath_core.data.tiling.cli import main

sys.exit(main())
