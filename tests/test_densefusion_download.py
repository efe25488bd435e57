"""The resumable, validating downloader (polyfocus/densefusion/download.py) against a loopback HTTP server that
serves good images, error statuses, flaky and slow endpoints, HTML and truncated files."""

import http.server
import io
import json
import threading
import time

import pytest
from PIL import Image

from polyfocus.densefusion import download as download_module
from polyfocus.densefusion.download import download, read_url_records

from test_densefusion_helpers import http_server

pytest.importorskip("httpx")


def image_bytes(size, fmt="PNG", colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, fmt)
    return buffer.getvalue()


PNG = image_bytes((200, 120))
JPEG = image_bytes((600, 500), "JPEG", (30, 60, 200))
SMALL = image_bytes((100, 80))


class Site(http.server.BaseHTTPRequestHandler):
    hits: dict = {}
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def reply(self, status, body=b"", content_type="image/png", headers=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers:
            self.send_header(key, value)
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self):
        with self.lock:
            self.hits[self.path] = self.hits.get(self.path, 0) + 1
            hit = self.hits[self.path]
        if self.path.startswith("/png/"):
            self.reply(200, PNG)
        elif self.path == "/photo.png":  # a JPEG behind a .png URL
            self.reply(200, JPEG, "image/jpeg")
        elif self.path == "/flaky":
            self.reply(503) if hit <= 2 else self.reply(200, PNG)
        elif self.path == "/busy":
            self.reply(429, headers=[("Retry-After", "0")]) if hit == 1 else self.reply(200, PNG)
        elif self.path == "/html":
            self.reply(200, b"<html><body>Not found, but 200</body></html>", "text/html")
        elif self.path == "/truncated":
            self.reply(200, JPEG[: len(JPEG) // 2], "image/jpeg")
        elif self.path == "/small":
            self.reply(200, SMALL)
        elif self.path == "/slow":
            time.sleep(1.0)
            self.reply(200, PNG)
        else:
            self.reply(404, b"no", "text/plain")


@pytest.fixture()
def site():
    handler = type("Site", (Site,), {"hits": {}, "lock": threading.Lock()})
    with http_server(handler) as base:
        yield base, handler


def records(base, paths):
    return [{"image_id": f"id{i}", "url": base + p, "caption": f"caption {i}"} for i, p in enumerate(paths)]


def test_an_id_that_extends_another_does_not_take_its_file(site, tmp_path):
    """Ids "a.b" then "a": the rerun's check for a finished "a" must not take images/a.b.png (the glob "a.*")."""
    base, handler = site
    download([{"image_id": "a.b", "url": base + "/photo.png"}], tmp_path, progress=False)
    download([{"image_id": "a.b", "url": base + "/photo.png"}, {"image_id": "a", "url": base + "/png/a"}], tmp_path,
             progress=False)
    manifest = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert [r["image"] for r in manifest] == ["images/a.b.jpg", "images/a.png"]
    assert (tmp_path / "images" / "a.png").read_bytes() == PNG and handler.hits["/png/a"] == 1


def test_good_bad_and_flaky_urls(site, tmp_path, monkeypatch):
    base, handler = site
    waits = []
    monkeypatch.setattr(download_module.time, "sleep", waits.append)  # record the backoff instead of sleeping
    paths = ["/png/a", "/photo.png", "/flaky", "/busy", "/missing", "/html", "/truncated", "/small"]
    summary = download(records(base, paths), tmp_path, workers=1, retries=3, timeout=5, backoff=0.25,
                       min_short_edge=100, progress=False)
    manifest = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert [r["image_id"] for r in manifest] == ["id0", "id1", "id2", "id3"]  # input order, all fields kept
    assert [r["image"] for r in manifest] == ["images/id0.png", "images/id1.jpg", "images/id2.png", "images/id3.png"]
    assert manifest[1]["caption"] == "caption 1"
    assert (tmp_path / "images" / "id1.jpg").read_bytes() == JPEG  # saved unchanged, named by its real format
    assert handler.hits["/flaky"] == 3 and handler.hits["/busy"] == 2 and handler.hits["/missing"] == 1
    assert waits == [0.25, 0.5, 0.0]  # flaky: backoff doubling; busy: the server's Retry-After
    failed = {r["image_id"]: r["error"] for r in map(json.loads, (tmp_path / "failed.jsonl").read_text().splitlines())}
    assert failed["id4"] == "HTTP 404 (after 1 attempt)"
    assert failed["id5"].startswith("not a readable image") and "<html>" in failed["id5"]
    assert failed["id6"].startswith("not a readable image")  # truncated
    assert failed["id7"] == "too small: 100x80, short edge < 100"  # the resolution filter
    assert summary["downloaded"] == 4 and summary["failed"] == 4
    assert not list((tmp_path / "images").glob(".*"))  # no temporary files left


def test_timeouts_are_retried_then_recorded(site, tmp_path):
    base, handler = site
    download(records(base, ["/slow"]), tmp_path, retries=1, timeout=0.2, backoff=0.01, progress=False)
    (failed,) = [json.loads(line) for line in (tmp_path / "failed.jsonl").read_text().splitlines()]
    assert "Timeout" in failed["error"] and "after 2 attempts" in failed["error"]
    assert handler.hits["/slow"] == 2


def test_rerun_resumes_validates_and_refetches_only_what_is_missing(site, tmp_path):
    base, handler = site
    batch = records(base, ["/png/a", "/png/b", "/png/c", "/missing"])
    download(batch, tmp_path, progress=False)
    assert handler.hits["/png/a"] == 1
    # as after a kill: one image never written (only a temporary file), one corrupted on disk
    (tmp_path / "images" / "id1.png").rename(tmp_path / "images" / ".id1.png.tmp99")
    (tmp_path / "images" / "id2.png").write_bytes(PNG[:40])
    summary = download(batch, tmp_path, progress=False)
    assert (handler.hits["/png/a"], handler.hits["/png/b"], handler.hits["/png/c"]) == (1, 2, 2)
    assert handler.hits["/missing"] == 2  # failures are tried again
    assert summary["downloaded"] == 3 and (tmp_path / "images" / "id2.png").read_bytes() == PNG


def test_url_list_and_cli_then_the_engine_reads_the_manifest(site, tmp_path):
    from polyfocus.cli import main
    from polyfocus.densefusion.sources import read_items, url_id

    base, _ = site
    urls = tmp_path / "urls.txt"
    urls.write_text(f"{base}/png/x\tA red thing\n# a comment\n{base}/missing\n")
    assert [r["alt_text"] for r in read_url_records(urls) if "alt_text" in r] == ["A red thing"]
    main(["densefusion", "download", "--urls", str(urls), "--out", str(tmp_path / "dl"), "--no-progress"])
    items = read_items(tmp_path / "dl" / "manifest.jsonl")
    assert [(i.image_id, i.image_path, i.alt_text) for i in items] == [
        (url_id(f"{base}/png/x"), f"images/{url_id(f'{base}/png/x')}.png", "A red thing")]


def test_densefusion_release_records_download_into_training_data(site, tmp_path):
    """DenseFusion-1M's jsonl (image_id, url, caption, image_path) -> manifest -> `polyfocus train`'s dataset."""
    from polyfocus.data.formats import load_samples

    base, _ = site
    release = [{"image_id": "1002078010534", "url": f"{base}/png/a", "caption": "A dense caption.",
                "image_path": "DenseFusion-1M/000045/1002078010534.png"}]
    download(release, tmp_path, progress=False)
    (sample,) = load_samples(tmp_path / "manifest.jsonl")
    assert sample.images == ["images/1002078010534.png"]  # the downloaded file, not the zip's path
    assert sample.messages[1] == {"role": "assistant", "content": "A dense caption."}


def test_ids_that_collide_as_file_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="map to one file name"):
        download([{"image_id": "a/b", "url": "http://x/1"}, {"image_id": "a_b", "url": "http://x/2"}], tmp_path,
                 progress=False)


def test_img2dataset_backend(site, tmp_path):
    pytest.importorskip("img2dataset")
    base, _ = site
    summary = download(records(base, ["/png/a", "/missing"]), tmp_path, backend="img2dataset", progress=False)
    assert summary["downloaded"] == 1 and (tmp_path / "images" / "id0.png").read_bytes() == PNG
