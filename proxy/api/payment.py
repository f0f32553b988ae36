"""Payment routes: the QR code of a pending order and WeChat Pay's notification callback."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import trio
from quart import Blueprint, Response, request

from proxy.api.common import current_user, gateway
from store.orders import get_order
from workers.errors import Conflict, InvalidRequest, NotFound
from workers.qr import qr_png

bp = Blueprint("payment", __name__, url_prefix="/api/payment")


@bp.get("/qrcode")
async def qrcode() -> Response | dict[str, Any]:
    user = await current_user()
    order_id = request.args.get("orderId")
    if not order_id:
        raise InvalidRequest("'orderId' is required.", param="orderId")
    order = await get_order(gateway().db, order_id)
    if order is None or order.user_id != user.id:
        raise NotFound("No such order.")
    if order.status != "pending" or order.code_url is None:
        raise Conflict(f"The order is {order.status}; there is nothing to pay.")
    expires_in = max(0, int((order.expires_at - datetime.now(UTC)).total_seconds()))
    wants_png = request.args.get("format") == "png" or \
        "image/png" in request.headers.get("accept", "")
    if wants_png:
        png = await trio.to_thread.run_sync(qr_png, order.code_url)
        return Response(png, mimetype="image/png")
    return {"code_url": order.code_url, "orderId": order.id, "expires_in": expires_in}


@bp.post("/notify/wxpay")
async def notify_wxpay() -> Response:
    body = await request.get_data(cache=False, as_text=False, parse_form_data=False)
    assert isinstance(body, bytes)
    headers = {k.lower(): v for k, v in request.headers.items()}
    outcome = await gateway().payments.notified(headers, body)
    if outcome.status == 204:
        return Response(b"", status=204)
    return Response(b'{"code": "FAIL", "message": "' + outcome.message.encode() + b'"}',
                    status=outcome.status, mimetype="application/json")
