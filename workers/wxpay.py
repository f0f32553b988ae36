"""WeChat Pay API v3 formats and cryptography: signing, verification, AEAD resources.

Owns the merchant configuration (:class:`MerchantConfig`; ``workers.wxpay_env`` reads it),
the request signature (``Authorization: WECHATPAY2-SHA256-RSA2048 ...``), the verification of
the platform's ``Wechatpay-*`` signature on responses and notifications, and the
``AEAD_AES_256_GCM`` resource encryption used by payment notifications. Everything here is
pure: time (``now``) and nonces are arguments.

Formats, from the WeChat Pay v3 "签名生成" / "签名验证" / "回调报文解密" documents:

- request message: ``METHOD\\nPATH?QUERY\\nTIMESTAMP\\nNONCE\\nBODY\\n`` (GET: empty body),
  signed SHA256-with-RSA (PKCS#1 v1.5) by the merchant key, base64;
- response / notification message: ``TIMESTAMP\\nNONCE\\nBODY\\n`` (an empty body still ends
  in ``\\n``), verified against the platform key named by ``Wechatpay-Serial``;
- resource: base64(ciphertext || 16-byte GCM tag), 12-byte nonce string, the APIv3 key (32
  bytes) as the AES-256 key, ``associated_data`` as AAD (may be empty).

Imports nothing from the gateway; must not import httpx (the client lives in
``workers.wxpay_client``).
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import orjson
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

AUTH_SCHEME: Final = "WECHATPAY2-SHA256-RSA2048"
AEAD_ALGORITHM: Final = "AEAD_AES_256_GCM"
DEFAULT_API_BASE: Final = "https://api.mch.weixin.qq.com"
EVENT_TRANSACTION_SUCCESS: Final = "TRANSACTION.SUCCESS"
RESOURCE_TYPE_ENCRYPTED: Final = "encrypt-resource"
ORIGINAL_TYPE_TRANSACTION: Final = "transaction"
APIV3_KEY_BYTES: Final = 32
GCM_NONCE_BYTES: Final = 12
GCM_TAG_BYTES: Final = 16

HEADER_TIMESTAMP: Final = "Wechatpay-Timestamp"
HEADER_NONCE: Final = "Wechatpay-Nonce"
HEADER_SIGNATURE: Final = "Wechatpay-Signature"
HEADER_SERIAL: Final = "Wechatpay-Serial"
HEADER_SIGNATURE_TYPE: Final = "Wechatpay-Signature-Type"

_AUTH_PARAM = re.compile(r'\s*([a-z_]+)="([^"]*)"\s*')
_TIMESTAMP = re.compile(r"[0-9]{1,12}")


class NotificationError(Exception):
    """A notification (or a signed response) that must not be trusted.

    The message is safe to log: it never contains key material or decrypted data.
    """


class SignatureError(NotificationError):
    """Missing or malformed ``Wechatpay-*`` headers, unknown serial, stale timestamp or a
    signature that does not verify. Raised for API responses as well as notifications."""


class DecryptError(NotificationError):
    """The AEAD resource is malformed or fails authentication (wrong key, nonce or AAD)."""


class MalformedNotification(NotificationError):
    """The body is not the JSON a payment notification should be."""


class UnexpectedEvent(NotificationError):
    """A well-formed notification of a kind we do not fulfil (not ``TRANSACTION.SUCCESS``)."""


class MerchantMismatch(NotificationError):
    """The decrypted transaction names another merchant (``mchid``) or app (``appid``)."""


@dataclass(frozen=True)
class MerchantConfig:
    """One direct merchant (普通商户) and the platform keys that sign WeChat Pay's replies.

    ``platform_keys`` maps a ``Wechatpay-Serial`` value to its key: a platform certificate
    serial, or in "微信支付公钥" mode the ``PUB_KEY_ID_...`` public key id.
    """

    mchid: str
    appid: str
    serial_no: str
    private_key: RSAPrivateKey = field(repr=False)
    apiv3_key: bytes = field(repr=False)
    platform_keys: Mapping[str, RSAPublicKey] = field(repr=False)
    notify_url: str
    api_base: str = DEFAULT_API_BASE

    def __post_init__(self) -> None:
        if len(self.apiv3_key) != APIV3_KEY_BYTES:
            raise ValueError(f"the APIv3 key must be {APIV3_KEY_BYTES} bytes")
        if not self.platform_keys:
            raise ValueError("at least one platform public key is required")

    @property
    def public_key_id(self) -> str | None:
        """The ``PUB_KEY_ID_...`` among the platform serials (public key mode), if any."""
        return next((s for s in self.platform_keys if s.startswith("PUB_KEY_ID_")), None)


@dataclass(frozen=True, slots=True)
class PaymentResult:
    """A transaction as WeChat Pay reports it (notification resource or order query)."""

    out_trade_no: str
    transaction_id: str | None
    trade_state: str
    amount_total_fen: int
    payer_total_fen: int | None
    currency: str
    mchid: str
    appid: str
    success_time: datetime | None

    @property
    def paid(self) -> bool:
        return self.trade_state == "SUCCESS"


# -- signatures -------------------------------------------------------------------------------


def new_nonce() -> str:
    """A 32-character random string for ``nonce_str`` / ``Wechatpay-Nonce``."""
    return secrets.token_hex(16).upper()


def request_message(method: str, url: str, timestamp: int, nonce: str, body: bytes) -> bytes:
    """The five-line string a merchant signs; ``url`` is the path plus ``?query`` if any."""
    head = f"{method.upper()}\n{url}\n{timestamp}\n{nonce}\n".encode()
    return head + body + b"\n"


def response_message(timestamp: str, nonce: str, body: bytes) -> bytes:
    """The three-line string WeChat Pay signs for a response or a notification."""
    return f"{timestamp}\n{nonce}\n".encode() + body + b"\n"


def rsa_sign(private_key: RSAPrivateKey, message: bytes) -> str:
    """SHA256 with RSA (PKCS#1 v1.5), base64."""
    signature = private_key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    return base64.b64encode(signature).decode("ascii")


def rsa_verify(public_key: RSAPublicKey, message: bytes, signature_b64: str) -> bool:
    try:
        signature = base64.b64decode(signature_b64, validate=True)
    except (binascii.Error, ValueError):
        return False
    try:
        public_key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return False
    return True


def build_authorization(
    config: MerchantConfig,
    method: str,
    url_path_with_query: str,
    body: bytes,
    *,
    timestamp: int,
    nonce: str,
) -> str:
    """The ``Authorization`` header value for one request."""
    message = request_message(method, url_path_with_query, timestamp, nonce, body)
    signature = rsa_sign(config.private_key, message)
    return (
        f'{AUTH_SCHEME} mchid="{config.mchid}",nonce_str="{nonce}",'
        f'signature="{signature}",timestamp="{timestamp}",serial_no="{config.serial_no}"'
    )


def parse_authorization(value: str) -> dict[str, str]:
    """The five parameters of an ``Authorization`` header (any order); SignatureError if not
    exactly ``mchid, nonce_str, signature, timestamp, serial_no``."""
    scheme, _, params = value.strip().partition(" ")
    if scheme != AUTH_SCHEME:
        raise SignatureError("unsupported authorization scheme")
    parsed: dict[str, str] = {}
    for item in params.split(","):
        match = _AUTH_PARAM.fullmatch(item)
        if match is None or match[1] in parsed:
            raise SignatureError("malformed authorization parameters")
        parsed[match[1]] = match[2]
    if set(parsed) != {"mchid", "nonce_str", "signature", "timestamp", "serial_no"}:
        raise SignatureError("authorization parameters missing or unexpected")
    return parsed


def verify_authorization(
    merchant_key: RSAPublicKey,
    method: str,
    url_path_with_query: str,
    body: bytes,
    authorization: str,
    *,
    now: float,
    max_skew_s: int = 300,
) -> dict[str, str]:
    """What WeChat Pay does with a merchant request (the sandbox uses it); returns the
    parsed parameters so the caller can check ``mchid`` and ``serial_no``."""
    params = parse_authorization(authorization)
    timestamp = _checked_timestamp(params["timestamp"], now, max_skew_s)
    message = request_message(method, url_path_with_query, timestamp, params["nonce_str"], body)
    if not rsa_verify(merchant_key, message, params["signature"]):
        raise SignatureError("request signature does not verify")
    return params


def sign_response(
    platform_key: RSAPrivateKey,
    serial: str,
    body: bytes,
    *,
    timestamp: int,
    nonce: str,
) -> dict[str, str]:
    """The ``Wechatpay-*`` headers WeChat Pay would send with ``body`` (sandbox side)."""
    message = response_message(str(timestamp), nonce, body)
    return {
        HEADER_TIMESTAMP: str(timestamp),
        HEADER_NONCE: nonce,
        HEADER_SIGNATURE: rsa_sign(platform_key, message),
        HEADER_SERIAL: serial,
        HEADER_SIGNATURE_TYPE: AUTH_SCHEME,
    }


def verify_signature(
    platform_keys: Mapping[str, RSAPublicKey],
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float,
    max_skew_s: int = 300,
) -> None:
    """Check the platform signature on a response or notification; SignatureError if not.

    ``body`` must be the raw bytes as received: re-serialised JSON will not verify.
    """
    lower = {name.lower(): value for name, value in headers.items()}

    def header(name: str) -> str:
        value = lower.get(name.lower(), "").strip()
        if not value:
            raise SignatureError(f"missing {name} header")
        return value

    timestamp, nonce = header(HEADER_TIMESTAMP), header(HEADER_NONCE)
    signature, serial = header(HEADER_SIGNATURE), header(HEADER_SERIAL)
    kind = lower.get(HEADER_SIGNATURE_TYPE.lower())
    if kind is not None and kind.strip() != AUTH_SCHEME:
        raise SignatureError("unsupported signature type")
    key = platform_keys.get(serial)
    if key is None:
        raise SignatureError("unknown platform serial")
    _checked_timestamp(timestamp, now, max_skew_s)
    if not rsa_verify(key, response_message(timestamp, nonce, body), signature):
        raise SignatureError("platform signature does not verify")


def _checked_timestamp(value: str, now: float, max_skew_s: int) -> int:
    if _TIMESTAMP.fullmatch(value) is None:
        raise SignatureError("malformed timestamp")
    timestamp = int(value)
    if abs(now - timestamp) > max_skew_s:
        raise SignatureError("timestamp outside the allowed clock skew")
    return timestamp


# -- AEAD resources ---------------------------------------------------------------------------


def _key_bytes(apiv3_key: bytes | str) -> bytes:
    key = apiv3_key.encode() if isinstance(apiv3_key, str) else apiv3_key
    if len(key) != APIV3_KEY_BYTES:
        raise DecryptError("the APIv3 key must be 32 bytes")
    return key


def encrypt_resource(
    apiv3_key: bytes | str,
    plaintext: bytes,
    *,
    nonce: str,
    associated_data: str,
    original_type: str = ORIGINAL_TYPE_TRANSACTION,
) -> dict[str, str]:
    """The ``resource`` object of a notification (what WeChat Pay sends; sandbox side)."""
    nonce_bytes = nonce.encode()
    if len(nonce_bytes) != GCM_NONCE_BYTES:
        raise ValueError(f"the nonce must be {GCM_NONCE_BYTES} bytes")
    sealed = AESGCM(_key_bytes(apiv3_key)).encrypt(nonce_bytes, plaintext, associated_data.encode())
    return {
        "original_type": original_type,
        "algorithm": AEAD_ALGORITHM,
        "ciphertext": base64.b64encode(sealed).decode("ascii"),
        "associated_data": associated_data,
        "nonce": nonce,
    }


def decrypt_resource(apiv3_key: bytes | str, resource: Mapping[str, Any]) -> dict[str, Any]:
    """Authenticate and decrypt a ``resource`` into its JSON object; DecryptError if not."""
    if resource.get("algorithm") != AEAD_ALGORITHM:
        raise DecryptError("unsupported resource algorithm")
    ciphertext, nonce = resource.get("ciphertext"), resource.get("nonce")
    associated = resource.get("associated_data") or ""
    if not isinstance(ciphertext, str) or not isinstance(nonce, str):
        raise DecryptError("resource ciphertext and nonce must be strings")
    if not isinstance(associated, str):
        raise DecryptError("resource associated_data must be a string")
    nonce_bytes = nonce.encode()
    if len(nonce_bytes) != GCM_NONCE_BYTES:
        raise DecryptError(f"resource nonce must be {GCM_NONCE_BYTES} bytes")
    try:
        sealed = base64.b64decode(ciphertext, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DecryptError("resource ciphertext is not base64") from exc
    if len(sealed) <= GCM_TAG_BYTES:
        raise DecryptError("resource ciphertext is too short")
    try:
        plaintext = AESGCM(_key_bytes(apiv3_key)).decrypt(nonce_bytes, sealed, associated.encode())
    except InvalidTag as exc:
        raise DecryptError("resource fails authentication") from exc
    try:
        decoded = orjson.loads(plaintext)
    except orjson.JSONDecodeError as exc:
        raise DecryptError("resource plaintext is not JSON") from exc
    if not isinstance(decoded, dict):
        raise DecryptError("resource plaintext is not a JSON object")
    return decoded


# -- notifications and transactions -----------------------------------------------------------


def parse_notification(
    config: MerchantConfig,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float,
    max_skew_s: int = 300,
) -> PaymentResult:
    """Verify, decrypt and check a payment notification (``POST notify_url``).

    Checks the platform signature, that the event is ``TRANSACTION.SUCCESS`` carrying an
    encrypted ``transaction``, that the transaction belongs to this ``mchid``/``appid`` and
    that its state is ``SUCCESS``. Whether the amount matches the order is the caller's check.
    """
    verify_signature(config.platform_keys, headers, body, now=now, max_skew_s=max_skew_s)
    try:
        envelope = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedNotification("notification body is not JSON") from exc
    if not isinstance(envelope, dict):
        raise MalformedNotification("notification body is not a JSON object")
    if envelope.get("event_type") != EVENT_TRANSACTION_SUCCESS:
        raise UnexpectedEvent("notification event_type is not TRANSACTION.SUCCESS")
    if envelope.get("resource_type") != RESOURCE_TYPE_ENCRYPTED:
        raise UnexpectedEvent("notification resource_type is not encrypt-resource")
    resource = envelope.get("resource")
    if not isinstance(resource, dict):
        raise MalformedNotification("notification has no resource object")
    if resource.get("original_type") != ORIGINAL_TYPE_TRANSACTION:
        raise UnexpectedEvent("notification resource is not a transaction")
    result = transaction_from_json(decrypt_resource(config.apiv3_key, resource))
    check_merchant(config, result)
    if not result.paid:
        raise UnexpectedEvent("notified transaction is not in state SUCCESS")
    return result


def check_merchant(config: MerchantConfig, result: PaymentResult) -> None:
    if result.mchid != config.mchid:
        raise MerchantMismatch("transaction mchid does not match the merchant")
    if result.appid != config.appid:
        raise MerchantMismatch("transaction appid does not match the merchant")


def transaction_from_json(data: Mapping[str, Any]) -> PaymentResult:
    """A transaction object (decrypted notification or order query) as a PaymentResult."""
    amount = data.get("amount")
    if not isinstance(amount, dict):
        raise MalformedNotification("transaction has no amount object")
    transaction_id = data.get("transaction_id")
    payer_total = amount.get("payer_total")
    success_time = data.get("success_time")
    currency = amount.get("currency")
    try:
        return PaymentResult(
            out_trade_no=_str(data, "out_trade_no"),
            transaction_id=transaction_id if isinstance(transaction_id, str) else None,
            trade_state=_str(data, "trade_state"),
            amount_total_fen=_int(amount, "total"),
            payer_total_fen=payer_total if _is_int(payer_total) else None,
            currency=currency if isinstance(currency, str) else "CNY",
            mchid=_str(data, "mchid"),
            appid=_str(data, "appid"),
            success_time=datetime.fromisoformat(success_time)
            if isinstance(success_time, str) and success_time
            else None,
        )
    except ValueError as exc:
        raise MalformedNotification(f"transaction field invalid: {exc}") from exc


def _str(data: Mapping[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(name)
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(data: Mapping[str, Any], name: str) -> int:
    value = data.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(name)
    return value
