"""The services a running gateway shares, built once by the composition root.

Passed explicitly to the /v1 app and stored on the Quart app; no module singletons.
"""

from __future__ import annotations

from dataclasses import dataclass

from observability.metrics import Metrics
from proxy.settings import Settings
from store.db import Database
from workers.accounts import Accounts
from workers.catalog import Catalog
from workers.dispatch import Dispatcher
from workers.events import Events
from workers.overload import Admission
from workers.payments import Payments
from workers.pool import KeyPool
from workers.throttle import FailureThrottle


@dataclass(frozen=True, slots=True)
class Gateway:
    settings: Settings
    db: Database
    metrics: Metrics
    pool: KeyPool
    accounts: Accounts
    catalog: Catalog
    dispatcher: Dispatcher
    payments: Payments
    events: Events
    login_by_account: FailureThrottle
    login_by_ip: FailureThrottle
    jwt_secret: str
    admission: Admission
