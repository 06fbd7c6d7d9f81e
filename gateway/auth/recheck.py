"""Revocation reaches open streams: the webhook's decisions for them are asked again, periodically.

With `auth.authorize_url`, a stream the token's streams claim does not grant was opened on the
webhook's word. Every `auth.recheck_interval` seconds each such open stream is asked about
again (one question per user and resource, bypassing the cache, within the webhook's
concurrency bound); a denial ends it with `access_revoked`. A webhook that cannot be asked
ends nothing: only an answer revokes, so a webhook outage never closes every stream at once.
"""

from __future__ import annotations

import asyncio
import logging

from gateway.auth.admission import Admission, StreamHold
from gateway.codec.closes import ACCESS_REVOKED

log = logging.getLogger("gateway.auth")


class Rechecker:
    """Asks the webhook again about open streams and ends the ones it now denies."""

    def __init__(self, admission: Admission, interval: float) -> None:
        self.admission = admission
        self.interval = interval

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.recheck()
            except Exception:  # a bug here must not stop later rechecks
                log.exception("access recheck failed")

    async def recheck(self) -> int:
        """One pass over every open stream granted by the webhook; returns how many were revoked."""
        authorizer = self.admission.authorizer
        asked: dict[tuple[str, str], list[StreamHold]] = {}
        for hold in list(self.admission.holds):
            if hold.released or authorizer.granted_by_claim(hold.admitted.principal, hold.resource):
                continue
            asked.setdefault((hold.consumer, hold.resource), []).append(hold)
        pairs = list(asked.items())
        answers = await asyncio.gather(*(authorizer.recheck(holds[0].admitted.principal, resource)
                                         for (_, resource), holds in pairs))
        revoked = 0
        for ((_, _resource), holds), allowed in zip(pairs, answers, strict=True):
            if allowed is False:
                for hold in holds:
                    if not hold.released and not hold.sub.closed:
                        hold.sub.close(ACCESS_REVOKED)
                        revoked += 1
        if revoked:
            log.info("access revoked", extra={"streams": revoked})
        return revoked
