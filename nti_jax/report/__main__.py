"""`python -m nti_jax.report OUT`: (re)write OUT/index.html."""

import sys

from nti_jax.report.html import main

sys.exit(main())
