"""QR code images for ``code_url`` (GET /api/payment/qrcode with ``Accept: image/png``).

Pure Python: ``qrcode`` with its PyPNG writer, no Pillow. Imports nothing from the gateway.
"""

from __future__ import annotations

import io

import qrcode  # type: ignore[import-untyped]  # qrcode ships no type information
from qrcode.constants import ERROR_CORRECT_M  # type: ignore[import-untyped]
from qrcode.image.pure import PyPNGImage  # type: ignore[import-untyped]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def qr_png(text: str, *, box_size: int = 8, border: int = 4) -> bytes:
    """A PNG of ``text`` as a QR code (error correction M, ``border`` modules of margin)."""
    code = qrcode.QRCode(
        error_correction=ERROR_CORRECT_M,
        box_size=box_size,
        border=border,
        image_factory=PyPNGImage,
    )
    code.add_data(text)
    code.make(fit=True)
    buffer = io.BytesIO()
    code.make_image().save(buffer)
    return buffer.getvalue()
