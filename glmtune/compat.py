"""The one place that uses private transformers / torch names, so an upgrade is checked here.

Each function wraps one private attribute, method or operator that glmtune relies on, with a comment
on why the public API does not do the job. A transformers or torch upgrade that renames one of them
breaks here (and in tests/test_compat.py), not somewhere deep in a training run.
"""

from __future__ import annotations
