"""Several replicas on PostgreSQL: each cluster's tracker cycle is held by one at a time."""

from __future__ import annotations

import threading

from broker.db import make_engine
from broker.tracker import cluster_lease


def test_one_replica_holds_a_clusters_cycle(db_url: str) -> None:
    engine_a, engine_b = make_engine(db_url), make_engine(db_url)  # two "replicas"
    try:
        with cluster_lease(engine_a, 1, "tracker") as a:
            assert a is True
            seen: list[bool] = []

            def other() -> None:
                with cluster_lease(engine_b, 1, "tracker") as b, cluster_lease(engine_b, 2, "tracker") as c:
                    seen.extend([b, c])

            t = threading.Thread(target=other)
            t.start()
            t.join(10)
            # SQLite is one process by design (always True); PostgreSQL refuses the second holder
            expected_b = engine_a.dialect.name != "postgresql"
            assert seen == [expected_b, True]
        with cluster_lease(engine_b, 1, "tracker") as again:
            assert again is True  # released at the end of the first holder's cycle
    finally:
        engine_a.dispose()
        engine_b.dispose()
