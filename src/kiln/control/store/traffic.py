"""Runtime traffic splits (`kiln traffic`, PUT /apis/{name}/traffic, set-default): one row
per API, so a split changed without a redeploy survives restarts and redeploys."""

from __future__ import annotations

import orjson
import sqlalchemy as sa

from . import schema as t
from .base import StoreBase

_T = t.api_traffic.c


class TrafficMixin(StoreBase):
    def get_traffic(self, api: str) -> dict[str, int] | None:
        """The runtime split of `api` (version -> weight), or None: kiln.yaml's applies."""
        with self._read() as conn:
            row = conn.execute(sa.select(_T.weights).where(_T.api == api)).first()
        if row is None:
            return None
        weights = orjson.loads(row.weights)
        return {str(k): int(v) for k, v in weights.items()}

    def set_traffic(self, api: str, weights: dict[str, int] | None) -> None:
        """Keep `weights` as the runtime split of `api` (None: forget it)."""
        with self._write() as conn:
            conn.execute(t.api_traffic.delete().where(_T.api == api))
            if weights is not None:
                conn.execute(
                    t.api_traffic.insert().values(
                        api=api, weights=orjson.dumps(weights).decode(), updated_at=self._now(None)
                    )
                )
