"""How a broker job is tagged on Slurm so it can be found again.

The tag goes into the job **name** (always stored in accounting, on every site)
and into the comment (stored only where ``AccountingStoreFlags=job_comment``).
Name format: ``<user name>.aifa-<tag>``; the tag is the broker's job UUID (hex).
"""

from __future__ import annotations

import re

TAG_MARK = ".aifa-"
_TAG_RE = re.compile(r"\.aifa-([0-9a-f]{32})$")


def job_name_with_tag(name: str, tag: str) -> str:
    """The Slurm job name carrying ``tag``."""
    return f"{name}{TAG_MARK}{tag}"


def tag_from_job_name(job_name: str | None) -> str | None:
    """The broker tag in a Slurm job name, or None for jobs not submitted by the broker."""
    if not job_name:
        return None
    m = _TAG_RE.search(job_name)
    return m.group(1) if m else None


def comment_for_tag(tag: str) -> str:
    return f"aifa-broker:{tag}"
