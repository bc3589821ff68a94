"""``python -m losa_deploy`` is the ``losa-deploy`` command."""

import sys

from .cli import main

sys.exit(main())
