"""`python -m phenoflow ...`: the same as the `phenoflow` console script."""
import sys

from phenoflow.cli import main

sys.exit(main())
