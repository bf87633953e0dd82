"""The resource side of Observe: a GET is rendered whole, cut to the block it asks for, and a
registration is handed to the site's `Observers` (coap/observers.py)."""

from __future__ import annotations

import time
from collections.abc import Hashable
from typing import Any

import aiocoap

from coap_auth.coap.block2 import block_of
from coap_auth.coap.endpoint import answer_error
from coap_auth.coap.observers import Observers
from coap_auth.errors import CoapAuthError


class ObservableEndpoint:
    """Mixin after `Endpoint` and before aiocoap's Resource: a GET is rendered whole by
    `render_get` (the resource's representation, shared), then the block it asks for is cut
    out (RFC 7959) and a registration (Observe 0) is handed to the site's `Observers`.
    Other methods go to aiocoap as before."""

    observers: Observers | None = None  # build_site sets it; without, GETs are not observed
    max_szx = 6  # 1024-byte blocks unless `observers` says less

    def get_link_description(self) -> dict[str, Any]:
        description: dict[str, Any] = super().get_link_description()  # type: ignore[misc]
        return {**description, "obs": None}

    def observation_shape(self, request: aiocoap.Message) -> Hashable:
        """What distinguishes this request's representation (a rendered GET's request)."""
        raise NotImplementedError

    async def render_to_pipe(self, pipe: Any) -> None:
        request = pipe.request
        if request.code != aiocoap.GET or request.opt.block1 is not None:
            await super().render_to_pipe(pipe)  # type: ignore[misc]
            return
        started = time.monotonic()
        response: aiocoap.Message = await self.render(request)  # type: ignore[attr-defined]
        observers = self.observers
        block2 = request.opt.block2
        observation = None
        if (
            observers is not None
            and request.opt.observe == 0
            and (block2 is None or block2.block_number == 0)  # RFC 7959 §2.6
            and response.code in (aiocoap.CONTENT, aiocoap.VALID)
        ):
            observation = observers.register(self, pipe, self.observation_shape(request))  # type: ignore[arg-type]
        szx = self.max_szx if observers is None else observers.max_szx
        try:
            answer = block_of(response, request, szx if observation is None else observation.szx)
        except CoapAuthError as error:
            path: str = self.path  # type: ignore[attr-defined]
            pipe.add_response(answer_error(request, error, path, started), is_last=True)
            return
        if observation is None or observers is None:
            pipe.add_response(answer, is_last=True)
            return
        observation.etag = response.opt.etag
        answer.opt.observe = observation.number
        await observers.answer(observation, answer)
