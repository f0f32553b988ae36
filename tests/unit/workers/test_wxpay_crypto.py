"""WeChat Pay v3 formats: request signatures, platform signatures, AEAD resources,
notifications, merchant configuration and QR images. Known answers come from the v3
"签名生成" / "签名验证" documents' worked examples."""

from __future__ import annotations

import base64
import datetime as dt
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
import png
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.x509.oid import NameOID

from workers.qr import PNG_SIGNATURE, qr_png
from workers.wxpay import (
    DecryptError,
    MalformedNotification,
    MerchantConfig,
    MerchantMismatch,
    NotificationError,
    SignatureError,
    UnexpectedEvent,
    build_authorization,
    decrypt_resource,
    encrypt_resource,
    parse_authorization,
    parse_notification,
    request_message,
    response_message,
    sign_response,
    verify_authorization,
    verify_signature,
)
from workers.wxpay_env import merchant_config_from_env

NOW = 1_700_000_000
APIV3_KEY = b"0123456789abcdef0123456789abcdef"
PLATFORM_SERIAL = "5157F09EFDC096DE15EBE81A47057A7232F1B8E1"


@pytest.fixture(scope="module")
def merchant_key() -> RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def platform_key() -> RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def config(merchant_key: RSAPrivateKey, platform_key: RSAPrivateKey) -> MerchantConfig:
    return MerchantConfig(
        mchid="1900009191",
        appid="wxd678efh567hg6787",
        serial_no="1DDE55AD98ED71D6EDD4A4A16996DE7B47773A8C",
        private_key=merchant_key,
        apiv3_key=APIV3_KEY,
        platform_keys={PLATFORM_SERIAL: platform_key.public_key()},
        notify_url="https://airgate.test/api/payment/notify/wxpay",
    )


def signed(
    platform_key: RSAPrivateKey, body: bytes, *, serial: str = PLATFORM_SERIAL, ts: int = NOW
) -> dict[str, str]:
    return sign_response(platform_key, serial, body, timestamp=ts, nonce="c5ac7061fccab6bf")


# -- message formats (known answers from the documents) -----------------------------------------


def test_request_message_matches_documented_example() -> None:
    message = request_message(
        "GET", "/v3/certificates", 1554208460, "593BEC0C930BF1AFEB40B4A08C8FB242", b""
    )
    assert message == b"GET\n/v3/certificates\n1554208460\n593BEC0C930BF1AFEB40B4A08C8FB242\n\n"


def test_response_message_matches_documented_example() -> None:
    body = b'{"prepay_id":"wx2922034726858082fbd40b511c67630000"}'
    expected = b"1554209980\nc5ac7061fccab6bf3e254dcf98995b8c\n" + body + b"\n"
    assert response_message("1554209980", "c5ac7061fccab6bf3e254dcf98995b8c", body) == expected
    # A 204 reply: the last line is a lone newline.
    assert response_message("1554209980", "abc", b"") == b"1554209980\nabc\n\n"


# -- request signatures -------------------------------------------------------------------------


def test_authorization_header_format_and_signature(
    config: MerchantConfig, merchant_key: RSAPrivateKey
) -> None:
    body = b'{"mchid":"1900009191"}'
    header = build_authorization(
        config, "POST", "/v3/pay/transactions/native", body, timestamp=NOW, nonce="N0NCE"
    )
    match = re.fullmatch(
        r'WECHATPAY2-SHA256-RSA2048 mchid="1900009191",nonce_str="N0NCE",'
        r'signature="([A-Za-z0-9+/=]+)",timestamp="1700000000",'
        r'serial_no="1DDE55AD98ED71D6EDD4A4A16996DE7B47773A8C"',
        header,
    )
    assert match is not None
    # Checked with the primitive directly, over the documented five-line message.
    message = f"POST\n/v3/pay/transactions/native\n{NOW}\nN0NCE\n".encode() + body + b"\n"
    merchant_key.public_key().verify(
        base64.b64decode(match[1]), message, padding.PKCS1v15(), hashes.SHA256()
    )
    # PKCS#1 v1.5 is deterministic: same inputs, same header.
    again = build_authorization(
        config, "POST", "/v3/pay/transactions/native", body, timestamp=NOW, nonce="N0NCE"
    )
    assert again == header


def test_verify_authorization_round_trip_and_tampering(
    config: MerchantConfig, merchant_key: RSAPrivateKey
) -> None:
    url = "/v3/pay/transactions/out-trade-no/order123?mchid=1900009191"
    header = build_authorization(config, "GET", url, b"", timestamp=NOW, nonce="abc")
    params = verify_authorization(merchant_key.public_key(), "GET", url, b"", header, now=NOW)
    assert params["mchid"] == config.mchid
    assert params["serial_no"] == config.serial_no
    with pytest.raises(SignatureError):
        verify_authorization(
            merchant_key.public_key(), "GET", url.replace("123", "124"), b"", header, now=NOW
        )
    with pytest.raises(SignatureError):
        verify_authorization(merchant_key.public_key(), "GET", url, b"", header, now=NOW + 301)


@pytest.mark.parametrize(
    "value",
    [
        'Bearer mchid="1"',
        'WECHATPAY2-SHA256-RSA2048 mchid="1",nonce_str="a",timestamp="1",serial_no="s"',
        'WECHATPAY2-SHA256-RSA2048 mchid="1",mchid="1",nonce_str="a",timestamp="1",serial_no="s"',
        "WECHATPAY2-SHA256-RSA2048 mchid=1,nonce_str=a,signature=x,timestamp=1,serial_no=s",
    ],
)
def test_parse_authorization_rejects_malformed_headers(value: str) -> None:
    with pytest.raises(SignatureError):
        parse_authorization(value)


# -- platform signatures ------------------------------------------------------------------------


def test_verify_signature_accepts_any_header_case(
    config: MerchantConfig, platform_key: RSAPrivateKey
) -> None:
    body = b'{"code_url":"weixin://wxpay/bizpayurl?pr=abc"}'
    headers = signed(platform_key, body)
    verify_signature(config.platform_keys, headers, body, now=NOW)
    verify_signature(
        config.platform_keys, {k.lower(): v for k, v in headers.items()}, body, now=NOW
    )
    verify_signature(
        config.platform_keys, {k.upper(): v for k, v in headers.items()}, body, now=NOW
    )


def test_verify_signature_rejects_tampered_body(
    config: MerchantConfig, platform_key: RSAPrivateKey
) -> None:
    headers = signed(platform_key, b'{"amount":1}')
    with pytest.raises(SignatureError, match="does not verify"):
        verify_signature(config.platform_keys, headers, b'{"amount":2}', now=NOW)


def test_verify_signature_rejects_unknown_serial(
    config: MerchantConfig, platform_key: RSAPrivateKey
) -> None:
    headers = signed(platform_key, b"{}", serial="PUB_KEY_ID_0000")
    with pytest.raises(SignatureError, match="unknown platform serial"):
        verify_signature(config.platform_keys, headers, b"{}", now=NOW)


def test_verify_signature_rejects_another_key_under_a_known_serial(
    config: MerchantConfig, merchant_key: RSAPrivateKey
) -> None:
    headers = signed(merchant_key, b"{}")
    with pytest.raises(SignatureError, match="does not verify"):
        verify_signature(config.platform_keys, headers, b"{}", now=NOW)


@pytest.mark.parametrize(("skew", "ok"), [(-301, False), (-300, True), (300, True), (301, False)])
def test_verify_signature_clock_skew_window(
    config: MerchantConfig, platform_key: RSAPrivateKey, skew: int, ok: bool
) -> None:
    headers = signed(platform_key, b"{}", ts=NOW)
    if ok:
        verify_signature(config.platform_keys, headers, b"{}", now=NOW + skew)
    else:
        with pytest.raises(SignatureError, match="clock skew"):
            verify_signature(config.platform_keys, headers, b"{}", now=NOW + skew)


@pytest.mark.parametrize("signature", ["not base64!!", "YWJj", ""])
def test_verify_signature_rejects_bad_signature_values(
    config: MerchantConfig, platform_key: RSAPrivateKey, signature: str
) -> None:
    headers = signed(platform_key, b"{}") | {"Wechatpay-Signature": signature}
    with pytest.raises(SignatureError):
        verify_signature(config.platform_keys, headers, b"{}", now=NOW)


@pytest.mark.parametrize(
    "missing",
    ["Wechatpay-Timestamp", "Wechatpay-Nonce", "Wechatpay-Signature", "Wechatpay-Serial"],
)
def test_verify_signature_requires_every_header(
    config: MerchantConfig, platform_key: RSAPrivateKey, missing: str
) -> None:
    headers = signed(platform_key, b"{}")
    del headers[missing]
    with pytest.raises(SignatureError, match=f"missing {missing}"):
        verify_signature(config.platform_keys, headers, b"{}", now=NOW)


def test_verify_signature_rejects_malformed_timestamp_and_type(
    config: MerchantConfig, platform_key: RSAPrivateKey
) -> None:
    headers = signed(platform_key, b"{}")
    with pytest.raises(SignatureError, match="malformed timestamp"):
        verify_signature(
            config.platform_keys, headers | {"Wechatpay-Timestamp": "17e8"}, b"{}", now=NOW
        )
    with pytest.raises(SignatureError, match="signature type"):
        verify_signature(
            config.platform_keys,
            headers | {"Wechatpay-Signature-Type": "WECHATPAY2-SM2-WITH-SM3"},
            b"{}",
            now=NOW,
        )


# -- AEAD_AES_256_GCM resources -----------------------------------------------------------------


def resource_for(payload: Mapping[str, Any], **overrides: str) -> dict[str, str]:
    resource = encrypt_resource(
        APIV3_KEY, orjson.dumps(payload), nonce="fdasflkja484", associated_data="transaction"
    )
    return resource | overrides


def test_resource_round_trip_and_documented_layout() -> None:
    resource = resource_for({"out_trade_no": "order123"})
    assert resource["algorithm"] == "AEAD_AES_256_GCM"
    assert resource["original_type"] == "transaction"
    assert decrypt_resource(APIV3_KEY, resource) == {"out_trade_no": "order123"}
    assert decrypt_resource(APIV3_KEY.decode(), resource) == {"out_trade_no": "order123"}
    # base64(ciphertext || 16-byte tag), key = APIv3 key, IV = nonce, AAD = associated_data:
    # decrypt with the split-tag primitive to pin the layout independently of AESGCM.
    sealed = base64.b64decode(resource["ciphertext"])
    decryptor = Cipher(
        algorithms.AES(APIV3_KEY), modes.GCM(b"fdasflkja484", sealed[-16:])
    ).decryptor()
    decryptor.authenticate_additional_data(b"transaction")
    plain = decryptor.update(sealed[:-16]) + decryptor.finalize()
    assert orjson.loads(plain) == {"out_trade_no": "order123"}


def test_empty_associated_data_is_allowed() -> None:
    resource: dict[str, Any] = encrypt_resource(
        APIV3_KEY, b'{"a":1}', nonce="abcdefghijkl", associated_data=""
    )
    assert decrypt_resource(APIV3_KEY, resource) == {"a": 1}
    assert decrypt_resource(APIV3_KEY, resource | {"associated_data": None}) == {"a": 1}


@pytest.mark.parametrize(
    ("key", "overrides"),
    [
        (b"ffffffffffffffffffffffffffffffff", {}),
        (APIV3_KEY, {"nonce": "fdasflkja485"}),
        (APIV3_KEY, {"associated_data": "certificate"}),
        (APIV3_KEY, {"associated_data": ""}),
        (APIV3_KEY, {"algorithm": "AEAD_AES_128_GCM"}),
        (APIV3_KEY, {"nonce": "short"}),
        (APIV3_KEY, {"ciphertext": "%%%not-base64%%%"}),
        (APIV3_KEY, {"ciphertext": base64.b64encode(b"0123456789abcdef").decode()}),
        (b"too-short-key", {}),
    ],
)
def test_decrypt_rejects_wrong_inputs(key: bytes, overrides: dict[str, str]) -> None:
    with pytest.raises(DecryptError):
        decrypt_resource(key, resource_for({"out_trade_no": "order123"}, **overrides))


def test_decrypt_rejects_flipped_ciphertext_bit() -> None:
    resource = resource_for({"out_trade_no": "order123"})
    sealed = bytearray(base64.b64decode(resource["ciphertext"]))
    sealed[0] ^= 1
    with pytest.raises(DecryptError, match="authentication"):
        decrypt_resource(APIV3_KEY, resource | {"ciphertext": base64.b64encode(sealed).decode()})


# -- notifications ------------------------------------------------------------------------------


def transaction(config: MerchantConfig, **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "appid": config.appid,
        "mchid": config.mchid,
        "out_trade_no": "order123",
        "transaction_id": "4200000000000000000000000001",
        "trade_type": "NATIVE",
        "trade_state": "SUCCESS",
        "trade_state_desc": "支付成功",
        "success_time": "2018-06-08T10:34:56+08:00",
        "payer": {"openid": "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"},
        "amount": {"total": 990, "payer_total": 990, "currency": "CNY", "payer_currency": "CNY"},
    }
    return data | overrides


def notification(
    platform_key: RSAPrivateKey, payload: Mapping[str, Any], **envelope: Any
) -> tuple[dict[str, str], bytes]:
    body = orjson.dumps(
        {
            "id": "EV-2018022511223320873",
            "create_time": "2015-05-20T13:29:35+08:00",
            "resource_type": "encrypt-resource",
            "event_type": "TRANSACTION.SUCCESS",
            "summary": "支付成功",
            "resource": resource_for(payload),
        }
        | envelope
    )
    return signed(platform_key, body), body


def test_parse_notification_returns_the_payment(
    config: MerchantConfig, platform_key: RSAPrivateKey
) -> None:
    headers, body = notification(platform_key, transaction(config))
    result = parse_notification(config, headers, body, now=NOW)
    assert result.out_trade_no == "order123"
    assert result.transaction_id == "4200000000000000000000000001"
    assert result.trade_state == "SUCCESS"
    assert result.paid
    assert (result.amount_total_fen, result.payer_total_fen, result.currency) == (990, 990, "CNY")
    assert (result.mchid, result.appid) == (config.mchid, config.appid)
    assert result.success_time == dt.datetime(
        2018, 6, 8, 10, 34, 56, tzinfo=dt.timezone(dt.timedelta(hours=8))
    )


@pytest.mark.parametrize(
    ("override", "error"),
    [
        ({"mchid": "1900000001"}, MerchantMismatch),
        ({"appid": "wx0000000000000000"}, MerchantMismatch),
        ({"trade_state": "NOTPAY"}, UnexpectedEvent),
        ({"amount": {"currency": "CNY"}}, MalformedNotification),
        ({"out_trade_no": 123}, MalformedNotification),
    ],
)
def test_parse_notification_rejects_bad_transactions(
    config: MerchantConfig,
    platform_key: RSAPrivateKey,
    override: dict[str, Any],
    error: type[NotificationError],
) -> None:
    headers, body = notification(platform_key, transaction(config, **override))
    with pytest.raises(error):
        parse_notification(config, headers, body, now=NOW)


@pytest.mark.parametrize(
    "envelope",
    [
        {"event_type": "REFUND.SUCCESS"},
        {"event_type": "TRANSACTION.FAIL"},
        {"resource_type": "plain"},
    ],
)
def test_parse_notification_rejects_other_events(
    config: MerchantConfig, platform_key: RSAPrivateKey, envelope: dict[str, str]
) -> None:
    headers, body = notification(platform_key, transaction(config), **envelope)
    with pytest.raises(UnexpectedEvent):
        parse_notification(config, headers, body, now=NOW)


def test_parse_notification_checks_the_signature_first(
    config: MerchantConfig, platform_key: RSAPrivateKey
) -> None:
    headers, body = notification(platform_key, transaction(config))
    with pytest.raises(SignatureError):
        parse_notification(config, headers, body.replace(b"EV-", b"EX-"), now=NOW)
    with pytest.raises(SignatureError):
        parse_notification(config, headers, body, now=NOW + 3600)


def test_parse_notification_rejects_signed_garbage(
    config: MerchantConfig, platform_key: RSAPrivateKey
) -> None:
    for body in (b"not json", b"[1, 2]"):
        with pytest.raises(MalformedNotification):
            parse_notification(config, signed(platform_key, body), body, now=NOW)


def test_parse_notification_wrong_apiv3_key(
    config: MerchantConfig, platform_key: RSAPrivateKey
) -> None:
    headers, body = notification(platform_key, transaction(config))
    other = MerchantConfig(**{**config.__dict__, "apiv3_key": b"ffffffffffffffffffffffffffffffff"})
    with pytest.raises(DecryptError):
        parse_notification(other, headers, body, now=NOW)


# -- configuration ------------------------------------------------------------------------------


def write_pems(tmp_path: Path, merchant_key: RSAPrivateKey, platform_key: RSAPrivateKey) -> None:
    (tmp_path / "apiclient_key.pem").write_bytes(
        merchant_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "pub_key.pem").write_bytes(
        platform_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Tenpay.com Root CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(platform_key.public_key())
        .serial_number(0x5157F09E)
        .not_valid_before(dt.datetime(2024, 1, 1, tzinfo=dt.UTC))
        .not_valid_after(dt.datetime(2034, 1, 1, tzinfo=dt.UTC))
        .sign(platform_key, hashes.SHA256())
    )
    (tmp_path / "wechatpay_cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def full_env(tmp_path: Path) -> dict[str, str]:
    return {
        "AIRGATE_WXPAY_MCHID": "1900009191",
        "AIRGATE_WXPAY_APPID": "wxd678efh567hg6787",
        "AIRGATE_WXPAY_SERIAL_NO": "1DDE55AD98ED71D6EDD4A4A16996DE7B47773A8C",
        "AIRGATE_WXPAY_PRIVATE_KEY_FILE": str(tmp_path / "apiclient_key.pem"),
        "AIRGATE_WXPAY_APIV3_KEY": APIV3_KEY.decode(),
        "AIRGATE_WXPAY_PLATFORM_PUBLIC_KEY_FILE": str(tmp_path / "pub_key.pem"),
        "AIRGATE_WXPAY_PLATFORM_SERIAL": "PUB_KEY_ID_0119000091912025010100000000000000",
        "AIRGATE_WXPAY_NOTIFY_URL": "https://airgate.test/api/payment/notify/wxpay",
    }


def test_config_absent_without_mchid() -> None:
    assert merchant_config_from_env({}) is None
    assert merchant_config_from_env({"AIRGATE_WXPAY_APPID": "wx1"}) is None


def test_config_from_env(
    tmp_path: Path, merchant_key: RSAPrivateKey, platform_key: RSAPrivateKey
) -> None:
    write_pems(tmp_path, merchant_key, platform_key)
    config = merchant_config_from_env(full_env(tmp_path))
    assert config is not None
    assert config.api_base == "https://api.mch.weixin.qq.com"
    assert config.public_key_id == "PUB_KEY_ID_0119000091912025010100000000000000"
    assert config.apiv3_key == APIV3_KEY
    assert APIV3_KEY.decode() not in repr(config)
    # A platform certificate works in place of the public key (平台证书 mode).
    env = full_env(tmp_path) | {
        "AIRGATE_WXPAY_PLATFORM_PUBLIC_KEY_FILE": str(tmp_path / "wechatpay_cert.pem"),
        "AIRGATE_WXPAY_PLATFORM_SERIAL": PLATFORM_SERIAL,
        "AIRGATE_WXPAY_API_BASE": "https://api2.mch.weixin.qq.com/",
    }
    config = merchant_config_from_env(env)
    assert config is not None
    assert config.public_key_id is None
    assert config.api_base == "https://api2.mch.weixin.qq.com"
    body = b"{}"
    verify_signature(config.platform_keys, signed(platform_key, body), body, now=NOW)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"AIRGATE_WXPAY_APPID": ""}, "AIRGATE_WXPAY_APPID"),
        ({"AIRGATE_WXPAY_SERIAL_NO": " "}, "AIRGATE_WXPAY_SERIAL_NO"),
        ({"AIRGATE_WXPAY_PRIVATE_KEY_FILE": "/nonexistent.pem"}, "PRIVATE_KEY_FILE"),
        ({"AIRGATE_WXPAY_PRIVATE_KEY_FILE": "{pub}"}, "PRIVATE_KEY_FILE"),
        ({"AIRGATE_WXPAY_PLATFORM_PUBLIC_KEY_FILE": "{key}"}, "PLATFORM_PUBLIC_KEY_FILE"),
        ({"AIRGATE_WXPAY_APIV3_KEY": "sekrit-too-short"}, "AIRGATE_WXPAY_APIV3_KEY"),
        ({"AIRGATE_WXPAY_PLATFORM_SERIAL": ""}, "AIRGATE_WXPAY_PLATFORM_SERIAL"),
        ({"AIRGATE_WXPAY_NOTIFY_URL": "ftp://x/y"}, "AIRGATE_WXPAY_NOTIFY_URL"),
        ({"AIRGATE_WXPAY_NOTIFY_URL": "https://x/notify?a=1"}, "AIRGATE_WXPAY_NOTIFY_URL"),
        ({"AIRGATE_WXPAY_API_BASE": "api.mch.weixin.qq.com"}, "AIRGATE_WXPAY_API_BASE"),
    ],
)
def test_config_errors_name_the_variable(
    tmp_path: Path,
    merchant_key: RSAPrivateKey,
    platform_key: RSAPrivateKey,
    change: dict[str, str],
    named: str,
) -> None:
    write_pems(tmp_path, merchant_key, platform_key)
    files = {"{pub}": str(tmp_path / "pub_key.pem"), "{key}": str(tmp_path / "apiclient_key.pem")}
    env = full_env(tmp_path) | {k: files.get(v, v) for k, v in change.items()}
    with pytest.raises(ValueError, match=named) as info:
        merchant_config_from_env(env)
    assert "sekrit" not in str(info.value)


def test_config_rejects_a_bad_apiv3_key_length(
    merchant_key: RSAPrivateKey, platform_key: RSAPrivateKey
) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        MerchantConfig(
            mchid="1",
            appid="wx1",
            serial_no="s",
            private_key=merchant_key,
            apiv3_key=b"short",
            platform_keys={"p": platform_key.public_key()},
            notify_url="https://x/n",
        )


# -- QR images ----------------------------------------------------------------------------------


def test_qr_png_is_a_png() -> None:
    image = qr_png("weixin://wxpay/bizpayurl?pr=abc123")
    assert image.startswith(PNG_SIGNATURE)
    width, height, _rows, _info = png.Reader(bytes=image).read()
    assert width == height
    assert width > 21 * 8  # at least a version-1 symbol at 8 px per module, plus border
