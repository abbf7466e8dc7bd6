"""A plugin whose import fails, as one with a missing dependency would."""

import aifa_no_such_dependency  # noqa: F401

Adapter = None
