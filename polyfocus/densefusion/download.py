"""Images from URL lists (`polyfocus densefusion download`), how DenseFusion-1M and LAION are released.

The reference's download.py (spec §6) does one GET per URL with no retry, writes whatever bytes came back (an
error page can end up as a ".png"), and loses every failure silently. Here:

- retries: connection errors, timeouts and HTTP 408 / 429 / 5xx are retried `retries` times, waiting
  backoff * 2^attempt seconds (or the server's Retry-After, up to a minute); other statuses fail at once;
- validation: the bytes must decode fully as an image within `max_pixels` (and, optionally, have a short edge of at
  least `min_short_edge`, DenseFusion's 448 resolution filter); they are then saved unchanged, under the extension
  of their real format;
- resumable: a file is written to a temporary name and renamed, so images/<id>.<ext> is either whole or absent; a
  rerun validates what is there and fetches only the rest (failures included);
- nothing lost: manifest.jsonl holds every downloaded record (input order, all its fields, plus `image`: the file,
  relative to the output folder, as the reference sets it), failed.jsonl every other one with its `error`.

The manifest is an input of `polyfocus densefusion run` and `curate`, and, for DenseFusion-1M's records (which
carry their captions), training data as it is. `backend="img2dataset"` hands the fetching to img2dataset (optional
dependency; faster at LAION scale) and writes the same manifest from its output.
"""

from __future__ import annotations

import io
import json
import os
import re
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from polyfocus.data.files import write_atomic
from polyfocus.data.images import MAX_IMAGE_PIXELS

EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "MPO": ".jpg", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp",
              "TIFF": ".tiff"}
RETRY_STATUS = {408, 429, 500, 502, 503, 504}
USER_AGENT = "polyfocus-densefusion/0.1 (image downloader; +https://github.com/baaivision/DenseFusion)"


class DownloadError(Exception):
    """A record that cannot be downloaded; `retry` says whether trying again may help."""

    def __init__(self, message: str, retry: bool = False, wait: float | None = None):
        super().__init__(message)
        self.retry, self.wait = retry, wait  # wait: the server's Retry-After, seconds


def read_url_records(source: str | os.PathLike) -> list[dict]:
    """Records with a `url` (and an `image_id`, made from the url when missing) from a JSONL / JSON list, or a text
    file of URLs (optionally "URL<TAB>alt-text")."""
    from polyfocus.data.formats import read_records
    from polyfocus.densefusion.sources import url_id

    source = os.fspath(source)
    if source.endswith(".txt"):
        records = []
        for n, line in enumerate(Path(source).read_text().splitlines(), 1):
            if line.strip() and not line.startswith("#"):
                url, _, alt = line.strip().partition("\t")
                records.append({"image_id": url_id(url), "url": url, **({"alt_text": alt} if alt else {})})
        return records
    records = []
    for where, record in read_records(source, None):
        if not isinstance(record, dict) or not isinstance(record.get("url"), str):
            raise ValueError(f"{source}: {where}: a record with a 'url' string is needed, got {record!r:.80}")
        records.append({**record, "image_id": str(record.get("image_id", record.get("key", url_id(record["url"]))))})
    return records


def file_stem(image_id: str) -> str:
    """A file name for an id: characters other than letters, digits, '.', '_' and '-' become '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", image_id).lstrip(".") or "_"


def check_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS, min_short_edge: int = 0) -> str:
    """The image format of `data` (e.g. "JPEG"), or DownloadError: not an image, truncated, too large or too small."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > max_pixels:
                    raise DownloadError(f"image too large: {image.width}x{image.height} pixels (limit {max_pixels})")
                image.load()
                fmt, size = image.format, image.size
    except DownloadError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds; all mean "not a usable image"
        head = data[:60].decode("latin-1").replace("\n", " ")
        raise DownloadError(f"not a readable image ({type(e).__name__}: {e}); the response starts {head!r}") from None
    if min(size) < min_short_edge:
        raise DownloadError(f"too small: {size[0]}x{size[1]}, short edge < {min_short_edge}")
    return fmt


class Downloader:
    def __init__(self, out: str | os.PathLike, retries: int = 3, timeout: float = 30.0, backoff: float = 1.0,
                 min_short_edge: int = 0, max_pixels: int = MAX_IMAGE_PIXELS, max_bytes: int = 64 * 2**20,
                 user_agent: str = USER_AGENT):
        import httpx

        self.out = Path(out)
        (self.out / "images").mkdir(parents=True, exist_ok=True)
        self.retries, self.backoff = retries, backoff
        self.min_short_edge, self.max_pixels, self.max_bytes = min_short_edge, max_pixels, max_bytes
        self.client = httpx.Client(timeout=timeout, follow_redirects=True, headers={"User-Agent": user_agent})
        self.httpx = httpx
        self._local = threading.local()

    def existing(self, stem: str) -> str | None:
        """images/<stem>.<ext> if a complete, valid image is already there (a corrupt one is removed)."""
        for path in (self.out / "images").glob(f"{stem}.*"):
            if path.suffix in EXTENSIONS.values() and path.stem == stem:  # "a.*" also matches id "a.b"'s a.b.png
                try:
                    check_image(path.read_bytes(), self.max_pixels, self.min_short_edge)
                    return f"images/{path.name}"
                except DownloadError:
                    path.unlink()
        return None

    def fetch(self, url: str) -> bytes:
        """The body of a 200 response, retrying what may pass on a second try."""
        for attempt in range(self.retries + 1):
            try:
                return self._get(url)
            except DownloadError as e:
                if not e.retry or attempt == self.retries:
                    raise DownloadError(f"{e} (after {attempt + 1} attempt{'s' if attempt else ''})") from None
                time.sleep(e.wait if e.wait is not None else self.backoff * 2 ** attempt)
        raise AssertionError("unreachable")

    def _get(self, url: str) -> bytes:
        try:
            with self.client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise DownloadError(f"HTTP {response.status_code}", retry=response.status_code in RETRY_STATUS,
                                        wait=_retry_after(response.headers.get("retry-after")))
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > self.max_bytes:
                        raise DownloadError(f"larger than {self.max_bytes} bytes")
                return bytes(body)
        except self.httpx.TransportError as e:  # connection refused / reset, timeouts, truncated bodies
            raise DownloadError(f"{type(e).__name__}: {e}", retry=True) from None
        except self.httpx.InvalidURL as e:
            raise DownloadError(f"invalid URL: {e}") from None

    def __call__(self, record: dict) -> dict:
        """The record with `image` set, or with `error`."""
        stem = file_stem(record["image_id"])
        done = self.existing(stem)
        if done:
            return {**record, "image": done}
        try:
            data = self.fetch(record["url"])
            fmt = check_image(data, self.max_pixels, self.min_short_edge)
        except DownloadError as e:
            return {**record, "error": str(e)}
        name = stem + EXTENSIONS.get(fmt, "." + fmt.lower())
        tmp = self.out / "images" / f".{name}.tmp{threading.get_ident()}"
        tmp.write_bytes(data)
        os.replace(tmp, self.out / "images" / name)
        return {**record, "image": f"images/{name}"}


def _retry_after(value: str | None) -> float | None:
    try:
        return min(60.0, max(0.0, float(value))) if value else None
    except ValueError:  # an HTTP date: use our own backoff
        return None


def download(records: list[dict], out: str | os.PathLike, workers: int = 16, backend: str = "native",
             progress: bool = True, **options) -> dict:
    """Download every record's url into out/images; write out/manifest.jsonl and out/failed.jsonl (input order).
    options: Downloader's (retries, timeout, backoff, min_short_edge, max_pixels, max_bytes, user_agent)."""
    from tqdm.auto import tqdm


    out = Path(out)
    stems: dict[str, str] = {}
    for record in records:
        stem = file_stem(record["image_id"])
        if stems.setdefault(stem, record["image_id"]) != record["image_id"]:
            raise ValueError(f"image ids {stems[stem]!r} and {record['image_id']!r} map to one file name {stem!r}")
    if backend == "img2dataset":
        results = download_with_img2dataset(records, out, workers, **options)
    elif backend == "native":
        fetch = Downloader(out, **options)
        with ThreadPoolExecutor(max(1, workers)) as pool:
            results = list(tqdm(pool.map(fetch, records), total=len(records), unit="img", desc="download",
                                disable=not progress))
    else:
        raise ValueError(f"backend must be native or img2dataset, got {backend!r}")
    ok = [r for r in results if "error" not in r]
    failed = [r for r in results if "error" in r]
    write_atomic(out / "manifest.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ok))
    write_atomic(out / "failed.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in failed))
    reasons: dict[str, int] = {}
    for r in failed:
        key = r["error"].split(":")[0].split(" (after")[0]
        reasons[key] = reasons.get(key, 0) + 1
    return {"records": len(records), "downloaded": len(ok), "failed": len(failed), "failure_reasons": reasons,
            "manifest": str(out / "manifest.jsonl"), "failed_file": str(out / "failed.jsonl")}


def download_with_img2dataset(records: list[dict], out: Path, workers: int, retries: int = 3, timeout: float = 30.0,
                              min_short_edge: int = 0, **unused) -> list[dict]:
    """img2dataset into out/img2dataset (files, original bytes: no resize, no re-encode), then each image checked
    and moved to images/<id>.<ext> as the native backend names it."""
    try:
        from img2dataset import download as img2dataset_download
    except ImportError as e:
        raise ImportError("backend img2dataset needs it installed: pip install img2dataset") from e

    staging = out / "img2dataset"
    urls = out / "img2dataset_urls.jsonl"
    write_atomic(urls, "".join(json.dumps({"url": r["url"], "image_id": r["image_id"]}) + "\n" for r in records))
    img2dataset_download(url_list=str(urls), input_format="jsonl", url_col="url", save_additional_columns=["image_id"],
                         output_folder=str(staging), output_format="files", resize_mode="no",
                         disable_all_reencoding=True, processes_count=1, thread_count=max(1, workers),
                         timeout=int(timeout), retries=retries, min_image_size=min_short_edge,
                         incremental_mode="incremental", enable_wandb=False)
    fetched = {}
    for meta in staging.rglob("*.json"):
        info = json.loads(meta.read_text())
        if info.get("status") == "success" and info.get("image_id") is not None:
            image = next((p for p in meta.parent.glob(meta.stem + ".*") if p.suffix not in (".json", ".txt")), None)
            fetched[str(info["image_id"])] = image
        elif info.get("image_id") is not None:
            fetched.setdefault(str(info["image_id"]), info.get("error_message") or info.get("status"))
    (out / "images").mkdir(parents=True, exist_ok=True)
    results = []
    for record in records:
        got = fetched.get(record["image_id"])
        if not isinstance(got, Path):
            results.append({**record, "error": f"img2dataset: {got or 'not downloaded'}"})
            continue
        try:
            fmt = check_image(got.read_bytes(), min_short_edge=min_short_edge)
        except DownloadError as e:
            results.append({**record, "error": str(e)})
            continue
        name = file_stem(record["image_id"]) + EXTENSIONS.get(fmt, "." + fmt.lower())
        os.replace(got, out / "images" / name)
        results.append({**record, "image": f"images/{name}"})
    return results
