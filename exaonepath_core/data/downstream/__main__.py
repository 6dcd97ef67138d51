"""`python -m exaonepath_core.data.downstream {check,prepare,sources}` (see `cli`)."""
import sys

from exaonepath_core.data.downstream.cli import main

sys.exit(main())
