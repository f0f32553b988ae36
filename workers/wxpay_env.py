"""The WeChat Pay merchant read from ``AIRGATE_WXPAY_*`` at start-up (the only I/O of the
payment formats: the PEM files those variables name). Imports ``workers.wxpay`` only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

from workers.wxpay import APIV3_KEY_BYTES, DEFAULT_API_BASE, MerchantConfig

_ENV = "AIRGATE_WXPAY_"


def merchant_config_from_env(environ: Mapping[str, str]) -> MerchantConfig | None:
    """The merchant from ``AIRGATE_WXPAY_*``, or None when ``AIRGATE_WXPAY_MCHID`` is unset.

    Any other missing or invalid variable is a ``ValueError`` naming it (never its value).
    """
    mchid = environ.get(f"{_ENV}MCHID", "").strip()
    if not mchid:
        return None

    def need(name: str) -> str:
        value = environ.get(f"{_ENV}{name}", "").strip()
        if not value:
            raise ValueError(f"{_ENV}{name} is required when {_ENV}MCHID is set")
        return value

    appid = need("APPID")
    serial_no = need("SERIAL_NO")
    private_key = _load_private_key(need("PRIVATE_KEY_FILE"), f"{_ENV}PRIVATE_KEY_FILE")
    apiv3_key = need("APIV3_KEY").encode()
    if len(apiv3_key) != APIV3_KEY_BYTES:
        raise ValueError(f"{_ENV}APIV3_KEY must be {APIV3_KEY_BYTES} bytes")
    platform_key = _load_public_key(
        need("PLATFORM_PUBLIC_KEY_FILE"), f"{_ENV}PLATFORM_PUBLIC_KEY_FILE"
    )
    platform_serial = need("PLATFORM_SERIAL")
    notify_url = need("NOTIFY_URL")
    _check_url(notify_url, f"{_ENV}NOTIFY_URL", allow_query=False)
    api_base = environ.get(f"{_ENV}API_BASE", "").strip() or DEFAULT_API_BASE
    _check_url(api_base, f"{_ENV}API_BASE", allow_query=False)
    return MerchantConfig(
        mchid=mchid,
        appid=appid,
        serial_no=serial_no,
        private_key=private_key,
        apiv3_key=apiv3_key,
        platform_keys={platform_serial: platform_key},
        notify_url=notify_url,
        api_base=api_base.rstrip("/"),
    )


def _read_pem(path: str, variable: str) -> bytes:
    try:
        with open(os.path.expanduser(path), "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise ValueError(f"{variable}: cannot read the file ({exc.strerror})") from exc


def _load_private_key(path: str, variable: str) -> RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(_read_pem(path, variable), password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{variable}: not an unencrypted PEM private key") from exc
    if not isinstance(key, RSAPrivateKey):
        raise ValueError(f"{variable}: not an RSA private key")
    return key


def _load_public_key(path: str, variable: str) -> RSAPublicKey:
    """A PEM public key (公钥 mode) or a PEM platform certificate (平台证书 mode)."""
    pem = _read_pem(path, variable)
    try:
        if b"BEGIN CERTIFICATE" in pem:
            key: object = x509.load_pem_x509_certificate(pem).public_key()
        else:
            key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise ValueError(f"{variable}: not a PEM public key or certificate") from exc
    if not isinstance(key, RSAPublicKey):
        raise ValueError(f"{variable}: not an RSA public key")
    return key


def _check_url(url: str, variable: str, *, allow_query: bool) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{variable} must be an http(s) URL")
    if not allow_query and (parts.query or parts.fragment):
        raise ValueError(f"{variable} must not carry query parameters")
