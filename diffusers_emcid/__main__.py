"""`python -m diffusers_emcid` is the `emcid` command."""

import sys

from .cli import main

sys.exit(main())
