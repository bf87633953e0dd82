"""The CoAP options the AS processes, and the site that answers 4.02 Bad Option to a request
carrying a critical option it does not (RFC 7252 §5.4.1): aiocoap has no such check.
"""

from __future__ import annotations

import time
from typing import Any

from aiocoap import resource

from coap_auth.coap.endpoint import answer_error, caller
from coap_auth.udp import bad_option


class OptionCheckingSite(resource.Site):
    """aiocoap's Site, refusing what RFC 7252 §5.4.1 says to refuse before any resource."""

    async def render_to_pipe(self, pipe: Any) -> None:
        request = pipe.request
        error = bad_option(request)
        if error is None:
            await super().render_to_pipe(pipe)
            return
        started = time.monotonic()
        caller.set("-")
        path = "/" + "/".join(request.opt.uri_path)
        pipe.add_response(answer_error(request, error, path, started), is_last=True)
