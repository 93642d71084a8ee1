"""The router in the ingress's own replica (`router.fused: true`): one Serve hop fewer per routed request.

`InProcessRouter` wraps a `Router` object built inside the ingress replica and answers the calls the ingress
makes on a router handle (`route.remote`, `options(stream=True).route_stream.remote`, `info.remote`,
`recent_events.remote`) by calling the object directly on the ingress's event loop. The router keeps
everything it does as a deployment: its admission queues, the weight sync with the learner (long-polled from
this replica), the decision shipper and its metrics, labelled with the ingress replica's id."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args: Any, **kwargs: Any):
        if inspect.isasyncgenfunction(self.fn):
            return self.fn(*args, **kwargs)  # an async generator: `__anext__` like a streaming response
        if inspect.iscoroutinefunction(self.fn):
            return self.fn(*args, **kwargs)
        fut = asyncio.get_running_loop().create_future()  # a plain method: awaitable like a DeploymentResponse
        try:
            fut.set_result(self.fn(*args, **kwargs))
        except Exception as e:  # noqa: BLE001 (raised where the caller awaits, as from a handle)
            fut.set_exception(e)
        return fut


class InProcessRouter:
    """A router object behind the handle surface the ingress uses."""

    def __init__(self, router):
        self.router = router
        self.route = _Method(router.route)
        self.route_stream = _Method(router.route_stream)
        self.info = _Method(router.info)
        self.recent_events = _Method(router.recent_events)

    def options(self, **_: Any) -> InProcessRouter:
        return self

    async def check_health(self) -> None:
        await self.router.check_health()

    def close(self) -> None:
        shipper = getattr(self.router, "shipper", None)
        if shipper is not None:
            shipper.close()
