"""Old module path of the aggregation rules, kept for users' imports: :mod:`fedgspo.robust.aggregators`."""

from fedgspo.robust.aggregators import *  # noqa: F401,F403
from fedgspo.robust.aggregators import __all__  # noqa: F401
