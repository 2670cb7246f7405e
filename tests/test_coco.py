"""coco_val10 against a mini COCO served from 127.0.0.1: same layout, same JSON format, drawn JPEGs.

The only fake is the far end (COCO's web server); the code under test does real HTTP, zip and disk work.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import socket
import threading
import time
import zipfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from refine.images.coco import (
    COCO_VAL10_IDS,
    STATE_FILE,
    ChecksumError,
    CocoUnavailableError,
    load_coco_val10,
    load_manifest,
    select_annotations,
)

OTHER_IDS = (139, 285)  # real val2017 ids that are not ours: their entries must be filtered out
CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 17, "name": "cat", "supercategory": "animal"},
    {"id": 63, "name": "couch", "supercategory": "furniture"},
    {"id": 75, "name": "remote", "supercategory": "electronic"},
    {"id": 2, "name": "bicycle", "supercategory": "vehicle"},
]
# Instances per image as (category_id, iscrowd); 6818 has none on purpose.
INSTANCES = {
    39769: [(17, 0), (17, 0), (75, 0), (75, 0), (63, 0)],
    397133: [(1, 0), (1, 0), (1, 1)],
    174482: [(2, 0), (2, 0), (2, 0), (1, 0)],
    139: [(17, 0)] * 7,
    285: [(63, 0)],
}
# Hand-computed expectations from INSTANCES (crowd counts as one; names sorted).
EXPECTED_OBJECTS = {
    "000000039769": {"cat": 2, "couch": 1, "remote": 2},
    "000000397133": {"person": 3},
    "000000174482": {"bicycle": 3, "person": 1},
    "000000006818": {},
}


def _captions_for(coco_id: int) -> list[str]:
    n = 6 if coco_id == 39769 else 5  # COCO has some images with more than 5
    return [f"caption {k} of image {coco_id}" for k in range(n)]


def _jpeg(coco_id: int, salt: int = 0) -> bytes:
    image = Image.new("RGB", (64 + coco_id % 7, 48), (coco_id % 251, 40 + salt, 90))
    ImageDraw.Draw(image).ellipse((8, 8, 30 + coco_id % 13, 40), fill=(230, 200 - salt, 20))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _build_mini_coco(root: Path) -> None:
    ids = list(COCO_VAL10_IDS) + list(OTHER_IDS)
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    for i in ids:
        (root / "val2017" / f"{i:012d}.jpg").write_bytes(_jpeg(i))
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 64, "height": 48} for i in reversed(ids)]
    caption_anns, ann_id = [], 1000
    for i in reversed(
        ids
    ):  # file order is the reverse of annotation-id order; captions carry stray whitespace
        for k, text in enumerate(_captions_for(i)):
            caption_anns.append({"id": ann_id + (9 - k), "image_id": i, "caption": f" {text}\n"})
        ann_id += 10
    instance_anns = [
        {"id": n, "image_id": i, "category_id": c, "iscrowd": crowd, "bbox": [0, 0, 1, 1], "area": 1}
        for n, (i, c, crowd) in enumerate(
            (i, c, crowd) for i, insts in INSTANCES.items() for c, crowd in insts
        )
    ]
    captions = {"info": {}, "licenses": [], "images": images, "annotations": caption_anns}
    instances = {
        "info": {},
        "licenses": [],
        "images": images,
        "annotations": instance_anns,
        "categories": CATEGORIES,
    }
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps(captions))
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(instances))
    with zipfile.ZipFile(
        root / "annotations" / "annotations_trainval2017.zip", "w", zipfile.ZIP_DEFLATED
    ) as zf:
        zf.writestr("annotations/captions_val2017.json", json.dumps(captions))
        zf.writestr("annotations/instances_val2017.json", json.dumps(instances))
        zf.writestr(
            "annotations/person_keypoints_val2017.json", json.dumps({"images": [], "annotations": []})
        )


@pytest.fixture(scope="module")
def mini_coco(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mini-coco")
    _build_mini_coco(root)
    return root


class _Server:
    def __init__(self, root: Path):
        self.requests: list[str] = []
        self.truncate: set[str] = set()  # paths whose body is cut in half (Content-Length stays whole)
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                if self.path not in server.truncate:
                    return super().do_GET()
                data = (root / self.path.lstrip("/")).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
        )
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )


@pytest.fixture
def server(mini_coco, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # conftest sets it; these tests use a local server
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    s = _Server(mini_coco)
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture
def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens here: connections are refused


def _expected_files() -> list[str]:
    return [f"/val2017/{i:012d}.jpg" for i in COCO_VAL10_IDS] + ["/annotations/annotations_trainval2017.zip"]


def _check_records(records, mini_coco: Path, cache_root: Path) -> None:
    assert [r.id for r in records] == [f"{i:012d}" for i in COCO_VAL10_IDS]
    for r, coco_id in zip(records, COCO_VAL10_IDS, strict=True):
        served = (mini_coco / "val2017" / f"{coco_id:012d}.jpg").read_bytes()
        assert r.sha256 == hashlib.sha256(served).hexdigest()
        assert r.path == cache_root / "coco_val10" / f"{coco_id:012d}.jpg"
        assert r.path.read_bytes() == served
        assert r.image.mode == "RGB" and r.image.size == (64 + coco_id % 7, 48)
        # Stripped, in annotation-id order (the file lists them in the opposite order), other ids' dropped.
        assert r.references == _captions_for(coco_id)[::-1]
        assert r.objects == EXPECTED_OBJECTS.get(r.id, {})
    assert len(records[0].references) == 6


def test_first_load_fetches_each_file_once_then_second_load_is_offline(server, mini_coco, tmp_path):
    records = load_coco_val10(cache_dir=tmp_path, base_url=server.base_url)
    _check_records(records, mini_coco, tmp_path)
    assert Counter(server.requests) == Counter(_expected_files())
    # Only the images and the small state file remain: the zip and temp files are gone.
    assert sorted(p.name for p in (tmp_path / "coco_val10").iterdir()) == sorted(
        [f"{i:012d}.jpg" for i in COCO_VAL10_IDS] + [STATE_FILE]
    )
    state = json.loads((tmp_path / "coco_val10" / STATE_FILE).read_text())
    assert set(state["images"]) == {f"{i:012d}" for i in COCO_VAL10_IDS}
    assert state["images"]["000000039769"]["sha256"] == records[0].sha256

    server.requests.clear()
    again = load_coco_val10(cache_dir=tmp_path, base_url=server.base_url)
    assert server.requests == []
    _check_records(again, mini_coco, tmp_path)


def test_corrupted_cached_image_raises_naming_the_file(server, mini_coco, tmp_path):
    load_coco_val10(cache_dir=tmp_path, base_url=server.base_url)
    bad = tmp_path / "coco_val10" / "000000087038.jpg"
    bad.write_bytes(_jpeg(87038, salt=60))  # still a valid JPEG, just different bytes
    server.requests.clear()
    with pytest.raises(ChecksumError, match=r"000000087038\.jpg.*recorded on first fetch"):
        load_coco_val10(cache_dir=tmp_path, base_url=server.base_url)
    assert server.requests == []  # a mismatch is reported, never silently re-fetched

    # Deleting the bad file re-fetches only that file, checked against the recorded sha256.
    bad.unlink()
    records = load_coco_val10(cache_dir=tmp_path, base_url=server.base_url)
    assert server.requests == ["/val2017/000000087038.jpg"]
    _check_records(records, mini_coco, tmp_path)


def test_refetch_of_a_changed_upstream_file_is_refused(server, mini_coco, tmp_path):
    load_coco_val10(cache_dir=tmp_path, base_url=server.base_url)
    (tmp_path / "coco_val10" / "000000006818.jpg").unlink()
    served = mini_coco / "val2017" / "000000006818.jpg"
    original = served.read_bytes()
    served.write_bytes(_jpeg(6818, salt=90))
    try:
        with pytest.raises(ChecksumError, match=r"val2017/000000006818\.jpg.*differ"):
            load_coco_val10(cache_dir=tmp_path, base_url=server.base_url)
    finally:
        served.write_bytes(original)
    assert not (tmp_path / "coco_val10" / "000000006818.jpg").exists()  # nothing written


def test_truncated_annotation_download_fails_cleanly_and_resumes(server, mini_coco, tmp_path):
    server.truncate.add("/annotations/annotations_trainval2017.zip")
    with pytest.raises(CocoUnavailableError, match=r"annotations_trainval2017\.zip"):
        load_coco_val10(cache_dir=tmp_path, base_url=server.base_url)
    set_dir = tmp_path / "coco_val10"
    assert not list(set_dir.glob(".*"))  # no half zip or temp file left behind
    state = json.loads((set_dir / STATE_FILE).read_text())  # the images' checksums were kept
    assert all(len(entry["sha256"]) == 64 for entry in state["images"].values())

    server.truncate.clear()
    server.requests.clear()
    records = load_coco_val10(cache_dir=tmp_path, base_url=server.base_url)
    assert server.requests == [
        "/annotations/annotations_trainval2017.zip"
    ]  # the images are not fetched again
    _check_records(records, mini_coco, tmp_path)


def test_coco_root_needs_no_server_and_fills_the_default_cache(
    mini_coco, tmp_path, closed_port_url, monkeypatch
):
    monkeypatch.setenv("REFINE_CACHE_DIR", str(tmp_path))
    records = load_coco_val10(coco_root=mini_coco, base_url=closed_port_url)
    _check_records(records, mini_coco, tmp_path)
    state = json.loads((tmp_path / "coco_val10" / STATE_FILE).read_text())
    assert state["images"]["000000039769"]["source"] == str(mini_coco / "val2017" / "000000039769.jpg")
    # Once cached, coco_root is not needed either.
    assert [r.sha256 for r in load_coco_val10(base_url=closed_port_url)] == [r.sha256 for r in records]


def test_coco_root_missing_annotations_names_the_path(mini_coco, tmp_path):
    root = tmp_path / "partial-coco"
    (root / "val2017").mkdir(parents=True)
    for i in COCO_VAL10_IDS:
        (root / "val2017" / f"{i:012d}.jpg").write_bytes(
            (mini_coco / "val2017" / f"{i:012d}.jpg").read_bytes()
        )
    with pytest.raises(FileNotFoundError, match=r"captions_val2017\.json does not exist"):
        load_coco_val10(coco_root=root, cache_dir=tmp_path / "cache")


def test_offline_with_empty_cache_says_what_to_do(closed_port_url, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    start = time.perf_counter()
    with pytest.raises(CocoUnavailableError) as info:
        load_coco_val10(cache_dir=tmp_path, base_url=closed_port_url)
    assert time.perf_counter() - start < 10  # refused quickly, no hang
    message = str(info.value)
    assert "refused" in message.lower()
    for hint in (
        "internet access",
        "--coco-root DIR",
        "--images DIR",
        "a glob",
        "a JSONL manifest",
        "shapes",
    ):
        assert hint in message


def test_hf_hub_offline_makes_no_request(server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CocoUnavailableError, match=r"HF_HUB_OFFLINE is set(.|\n)*--coco-root DIR"):
        load_coco_val10(cache_dir=tmp_path, base_url=server.base_url)
    assert server.requests == []


def test_select_annotations_keeps_only_our_ids_and_names_unknown_ones():
    captions = {
        "images": [{"id": 1}, {"id": 2}],
        "annotations": [
            {"id": 9, "image_id": 1, "caption": "b "},
            {"id": 3, "image_id": 1, "caption": " a"},
            {"id": 4, "image_id": 2, "caption": "other"},
        ],
    }
    instances = {
        "images": [{"id": 1}, {"id": 2}],
        "categories": [{"id": 5, "name": "dog"}, {"id": 6, "name": "bed"}],
        "annotations": [
            {"image_id": 1, "category_id": 5},
            {"image_id": 1, "category_id": 6},
            {"image_id": 1, "category_id": 5, "iscrowd": 1},
            {"image_id": 2, "category_id": 6},
        ],
    }
    assert select_annotations(captions, instances, [1]) == {
        1: {"references": ["a", "b"], "objects": {"bed": 1, "dog": 2}}
    }
    with pytest.raises(ValueError, match="image id 7 is not listed"):
        select_annotations(captions, instances, [7])


def test_manifest_matches_the_ids_and_coco_urls():
    manifest = load_manifest()
    assert [item["coco_id"] for item in manifest["images"]] == list(COCO_VAL10_IDS)
    assert [item["file_name"] for item in manifest["images"]][0] == "000000039769.jpg"
    assert (
        manifest["image_url"].format(base_url="http://images.cocodataset.org", file_name="000000039769.jpg")
        == "http://images.cocodataset.org/val2017/000000039769.jpg"
    )
    assert "trust on first use" in manifest["description"]
