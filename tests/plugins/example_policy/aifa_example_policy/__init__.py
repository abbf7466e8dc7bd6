"""An example site eligibility policy shipped outside the broker: projects in the
``playground`` access mode may use at most 2 GPUs per job. Add
``example_gpu_cap`` to the settings' ``eligibility_chain`` to use it."""

from __future__ import annotations

from broker.policy import Denial, EligibilityContext

__version__ = "0.3.1"
MAX_PLAYGROUND_GPUS = 2


class GpuCapForPlayground:
    """Deny playground jobs asking more than two GPUs in total."""

    name = "example_gpu_cap"

    def check(self, ctx: EligibilityContext) -> Denial | None:
        gpus = ctx.request.nodes * ctx.request.gpus_per_node
        if ctx.project.access_mode == "playground" and gpus > MAX_PLAYGROUND_GPUS:
            return Denial("limit_exceeded",
                          f"Playground projects may use at most {MAX_PLAYGROUND_GPUS} GPUs per job ({gpus} asked).")
        return None
