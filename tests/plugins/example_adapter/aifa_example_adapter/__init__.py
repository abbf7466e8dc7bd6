"""An example site adapter shipped outside the broker: a workstation pool that runs
jobs with the broker's local runner under a site-wide cap on the time limit
(``site_max_minutes`` in the cluster definition's ``connection`` table) and says
which site it is in its health check (``site_name``).

It imports only the broker's public adapter interface (``broker.adapter``) and the
runner it builds on; the broker finds it through the ``aifa_broker.adapters`` entry
point ``example_site``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from adapters.local import LocalAdapter
from broker.adapter import Health, JobSpec, SchedulerJobRef, SubmitRejected

__version__ = "1.2.0"


class ExampleSiteAdapter(LocalAdapter):
    """The local runner with a site policy on top."""

    def __init__(self, name: str, settings: Any, *, data_dir: str) -> None:
        site = dict(settings)
        self.site_name = str(site.pop("site_name", "example-site"))
        self.site_max_minutes = int(site.pop("site_max_minutes", 24 * 60))
        super().__init__(name, site, data_dir=data_dir)

    def submit(self, spec: JobSpec) -> SchedulerJobRef:
        if spec.time_limit_minutes > self.site_max_minutes:
            raise SubmitRejected(f"{self.site_name} allows at most {self.site_max_minutes} minutes per job",
                                 code="invalid_time_limit")
        return super().submit(spec)

    def health(self) -> Health:
        health = super().health()
        return dataclasses.replace(health, checks={**dict(health.checks), "site": self.site_name})
