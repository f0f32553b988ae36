"""The in-memory model catalogue: models, their groups and prices, read on every request.

Loaded from Postgres at start-up and after an admin change (``reload``), so the request
path never waits on the database for it.
"""

from __future__ import annotations

from store.db import Database
from store.models import Model, list_models
from workers.pricing import Prices


class Catalog:
    def __init__(self) -> None:
        self.models: dict[str, Model] = {}
        self.prices: dict[str, Prices] = {}

    async def reload(self, db: Database) -> None:
        models = await list_models(db)
        self.models = {m.id: m for m in models}
        self.prices = {
            m.id: Prices(m.input_price, m.output_price, m.cached_price) for m in models
        }

    def get(self, model_id: str) -> Model | None:
        model = self.models.get(model_id)
        return model if model is not None and model.status == "active" else None
