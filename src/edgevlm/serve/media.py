"""Images from a chat request: the bytes of a `data:image/...;base64,` URL, or a file under the
server's `--media-path`. Nothing here opens a network connection: an http(s) URL is refused
with a message saying to send the bytes, and a local path is resolved (symlinks included) and
read only when it stays inside the media folder. Pixels are counted from the image header,
before anything is decoded, so a small file that would expand to gigabytes is refused cheaply."""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from edgevlm.serve.api_error import APIError, bad_request

DATA_URL = re.compile(r"data:([^;,]*)((?:;[^;,]*)*),(.*)", re.S)
SEND_BYTES = "send the image's bytes as a data:image/png;base64,... URL"


def load_image_url(url: str, media_path: Path | None, max_pixels: int) -> Image.Image:
    """The image an `image_url.url` names, decoded; APIError (400/413) says what was wrong."""
    if not isinstance(url, str) or not url:
        raise bad_request("image_url.url must be a non-empty string", "messages")
    if url.startswith("data:"):
        return _decode(_data_url_bytes(url), "the data URL", max_pixels)
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https", "ftp", "ws", "wss"):
        raise bad_request(f"this server never fetches URLs ({scheme}://...); {SEND_BYTES}",
                          "messages")
    if scheme == "file":
        path = unquote(urlparse(url).path)
    elif scheme and len(scheme) > 1:  # one letter is a Windows drive, C:\...
        raise bad_request(f"image URL scheme {scheme!r} is not supported; {SEND_BYTES}",
                          "messages")
    else:
        path = url
    return _decode(_read_local(path, media_path), f"image {path}", max_pixels)


def _data_url_bytes(url: str) -> bytes:
    m = DATA_URL.fullmatch(url)
    if m is None:
        raise bad_request("the data URL has no comma; write data:image/png;base64,<bytes>",
                          "messages")
    mime, params, payload = m.group(1).strip().lower(), m.group(2).lower(), m.group(3)
    if not mime.startswith("image/"):
        raise bad_request(f"the data URL's type is {mime or 'missing'!r}, not image/...; "
                          "send an image (image/png, image/jpeg, image/webp, ...)", "messages")
    if ";base64" not in params:
        raise bad_request("the data URL is not base64; write data:image/png;base64,<bytes>",
                          "messages")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(f"the data URL's base64 does not decode ({e})", "messages") from e


def _read_local(path: str, media_path: Path | None) -> bytes:
    if media_path is None:
        raise bad_request(f"local image paths are refused ({path!r}): this server was started "
                          f"without --media-path; {SEND_BYTES}", "messages")
    root = Path(media_path).resolve()
    try:
        target = (root / path).resolve()  # an absolute `path` replaces root, then is checked
    except (OSError, RuntimeError, ValueError) as e:
        raise bad_request(f"image path {path!r} cannot be resolved ({e})", "messages") from e
    if not target.is_relative_to(root):
        raise bad_request(f"image path {path!r} is outside --media-path {root} (symlinks "
                          "resolved); put the file under that folder or send its bytes",
                          "messages")
    if not target.is_file():
        raise bad_request(f"image {path!r} is not a file under --media-path {root}", "messages")
    try:
        return target.read_bytes()
    except OSError as e:
        raise bad_request(f"cannot read image {path!r} ({e.strerror or e})", "messages") from e


def _decode(data: bytes, where: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                raise APIError(413, f"{where} is {w}x{h} = {w * h} pixels, over "
                               f"--max-image-pixels {max_pixels}; downscale it", "messages",
                               "image_too_large")
            im.load()
        return im
    except APIError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise APIError(413, f"{where} is too large to decode safely ({e})", "messages",
                       "image_too_large") from e
    except Exception as e:  # noqa: BLE001  PIL's plugins raise OSError, ValueError, struct
        # errors and more on a broken file: all of them are bad input, not a server fault
        raise bad_request(f"{where} is not an image PIL can decode ({type(e).__name__}: {e}); "
                          "send a PNG, JPEG, WebP, ... file", "messages") from e
