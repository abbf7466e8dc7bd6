"""The cyclic garbage collector of a process that serves the API.

CPython's collector is generational: every 700 net allocations of container
objects it examines the youngest objects, every 10 of those the middle generation,
and then every object of the process in a full collection, holding the GIL
throughout. A serving process holds ~170,000 long-lived objects from its start
(modules, the app, its routes, models, SQLAlchemy tables) and a burst of reads keeps
many young objects alive at once (every request in flight), so the middle and full
collections ran often and long: measured under B5 (500 readers, 2 workers),
~10 full collections per worker in 30 s of ~100 ms of CPU each, plus ~1.2 s of
young and middle collections — about a tenth of a worker's CPU, and each full
collection a pause in which the worker answered nothing, so every request queued
behind it waited that much longer (B5's p95).

:func:`settle_for_serving` is called once the app is built, before the first
request: it collects, then freezes what is alive (those objects are never examined
again — they live as long as the process), and raises the youngest generation's
threshold, so that short-lived request objects are freed by their reference counts
before a collection sees them instead of being promoted. Measured under the same
load: no full collection during the run, ~30 ms of collection CPU per worker in
30 s. Cyclic garbage is still collected, later.
"""

from __future__ import annotations

import gc

#: net container allocations between two collections of the youngest generation
#: (CPython's default is 700: a few requests' worth of objects under load)
YOUNG_THRESHOLD = 20_000


def settle_for_serving() -> None:
    """Collect, freeze what survives (the process's long-lived objects) and raise
    the youngest generation's threshold. Call once, after building the app; not in
    a process that builds apps again and again (tests): what it freezes is never
    collected."""
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, oldest)
