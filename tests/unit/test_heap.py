"""A serving process freezes its long-lived objects and raises the youngest
generation's threshold before it serves (broker/heap.py), and cyclic garbage made
afterwards is still collected. Each case runs in its own interpreter: freezing the
test process's heap would keep every later test's garbage."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from broker.heap import YOUNG_THRESHOLD


def _run(code: str) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=120, check=True)
    got: dict[str, int] = json.loads(out.stdout.strip().splitlines()[-1])
    return got


def test_settle_freezes_the_live_heap_and_later_cycles_are_still_collected() -> None:
    got = _run("""
        import gc, json
        import broker.api.app  # a serving process's modules
        from broker.heap import settle_for_serving

        before = len(gc.get_objects())
        settle_for_serving()
        frozen, examined = gc.get_freeze_count(), len(gc.get_objects())

        class Node:
            pass

        for _ in range(100):  # garbage made while serving: cycles
            a, b = Node(), Node()
            a.other, b.other = b, a
        del a, b
        print(json.dumps({"before": before, "frozen": frozen, "examined": examined,
                          "young": gc.get_threshold()[0], "collected": gc.collect()}))
    """)
    assert got["frozen"] >= got["before"] * 0.9  # what lived at the start is frozen ...
    assert got["examined"] < 1_000  # ... and no longer examined by a collection
    assert got["young"] == YOUNG_THRESHOLD
    assert got["collected"] >= 200  # the 100 cycles made afterwards are freed


def test_serve_settles_the_heap_before_serving_one_process_and_workers() -> None:
    got = _run("""
        import gc, json, types
        import uvicorn
        from broker import server

        seen = {}

        def fake_run(app, **kwargs):  # what uvicorn finds when it would start serving
            seen["single"] = gc.get_freeze_count()

        def fake_server_run(self, sockets=None):
            seen["worker"] = gc.get_freeze_count()
            for s in sockets or ():
                s.close()

        uvicorn.run = fake_run
        server.run(types.SimpleNamespace(log_level="WARNING"), host="127.0.0.1", port=0, workers=1,
                   single=lambda settings: object())
        gc.unfreeze()
        uvicorn.Server.run = fake_server_run
        server._worker_main("types:SimpleNamespace", "127.0.0.1", 0, "warning")
        seen["young"] = gc.get_threshold()[0]
        print(json.dumps(seen))
    """)
    assert got["single"] > 10_000
    assert got["worker"] > 10_000
    assert got["young"] == YOUNG_THRESHOLD
