"""The regions stage: exact tiling / mapping / merging / views on hand-made boxes, then the real stage
end to end on bus.jpg with a randomly initialised YOLOv8n built from its yaml (no weights download)."""

from __future__ import annotations

import io
import random

import pytest
import torch
from PIL import Image

from refine.images.records import ImageRecord, record_from_image, record_from_path
from refine.infra.cache import DiskCache
from refine.infra.devices import preserved_torch_threads
from refine.stages.regions import (
    ObjectSummary,
    RegionConfig,
    Regions,
    detect,
    detector_fingerprint,
    find,
    load_detector,
    select_views,
    summarize,
)
from refine.stages.tiling import Detection, choose_tiles, cut_sides, merge, pad_box, tile_boxes, to_full_image

# 100x60 image, grid 2, overlap 0.2, by hand: a tile side t solves 2t - 0.2t = L, rounded up:
#   x: t = ceil(100 / 1.8 = 55.6) = 56, starts 0 and 100 - 56 = 44  (shared 12 px >= 0.2 * 56 = 11.2)
#   y: t = ceil( 60 / 1.8 = 33.3) = 34, starts 0 and  60 - 34 = 26  (shared  8 px >= 0.2 * 34 = 6.8)
TILES_2 = [(0.0, 0.0, 56.0, 34.0), (44.0, 0.0, 100.0, 34.0),
           (0.0, 26.0, 56.0, 60.0), (44.0, 26.0, 100.0, 60.0)]
LEFT_TILE, RIGHT_TILE = TILES_2[0], TILES_2[1]


# --- tiling and mapping ------------------------------------------------------------------------------


def test_tile_boxes_grid2_matches_hand_computed_windows():
    assert tile_boxes(100, 60, 2, 0.2) == TILES_2


def test_tile_boxes_grid3_and_edge_cases():
    # x: t = ceil(100 / (3 - 0.4) = 38.46) = 39; starts spread over 100 - 39 = 61: 0, 30.5 -> 31 (half up), 61
    # y: t = ceil( 60 / 2.6 = 23.08) = 24; starts over 36: 0, 18, 36
    tiles = tile_boxes(100, 60, 3, 0.2)
    assert [t[0] for t in tiles[:3]] == [0.0, 31.0, 61.0]
    assert [t[1] for t in tiles[::3]] == [0.0, 18.0, 36.0]
    assert {(t[2] - t[0], t[3] - t[1]) for t in tiles} == {(39.0, 24.0)}  # equal sizes: one unpadded batch
    assert len(tiles) == 9 and tiles[-1] == (61.0, 36.0, 100.0, 60.0)
    assert tile_boxes(100, 60, 1, 0.2) == [(0.0, 0.0, 100.0, 60.0)]
    assert tile_boxes(100, 60, 2, 0.0) == [(0.0, 0.0, 50.0, 30.0), (50.0, 0.0, 100.0, 30.0),
                                            (0.0, 30.0, 50.0, 60.0), (50.0, 30.0, 100.0, 60.0)]
    # grid 3, overlap 0.1 on 42 px: t = 42 / 2.8 = 15 exactly (3 * 15 - 2 * 1.5 = 42), but floating point
    # gives 15.000000000000002; the tile must still be 15, not 16. Starts over 27: 0, 13.5 -> 14, 27
    first_row = [(0.0, 0.0, 15.0, 15.0), (14.0, 0.0, 29.0, 15.0), (27.0, 0.0, 42.0, 15.0)]
    assert tile_boxes(42, 42, 3, 0.1)[:3] == first_row


@pytest.mark.parametrize("args", [(100, 60, 0, 0.2), (100, 60, 2, 1.0), (100, 60, 2, -0.1), (0, 60, 2, 0.2)])
def test_tile_boxes_rejects_bad_input(args):
    with pytest.raises(ValueError):
        tile_boxes(*args)


def test_to_full_image_translates_by_the_window_origin():
    assert to_full_image((5.0, 6.0, 20.0, 30.0), TILES_2[3]) == (49.0, 32.0, 64.0, 56.0)
    assert to_full_image((5.0, 6.0, 20.0, 30.0), TILES_2[0]) == (5.0, 6.0, 20.0, 30.0)


def test_cut_sides_only_counts_inner_tile_edges():
    # touching the left tile's right edge (x = 56, inside the image) is a cut; its left edge is the border
    assert cut_sides((0.0, 10.0, 56.0, 30.0), LEFT_TILE, 100, 60) == ("right",)
    assert cut_sides((44.0, 0.0, 80.0, 34.0), RIGHT_TILE, 100, 60) == ("left", "bottom")
    # within tolerance: 2% of the 56-px side is 1.12 px, so 55 counts and 54 does not
    assert cut_sides((10.0, 10.0, 55.0, 30.0), LEFT_TILE, 100, 60) == ("right",)
    assert cut_sides((10.0, 10.0, 54.0, 30.0), LEFT_TILE, 100, 60) == ()
    assert cut_sides((0.0, 0.0, 100.0, 60.0), (0.0, 0.0, 100.0, 60.0), 100, 60) == ()  # full image


# --- merging -------------------------------------------------------------------------------------------


def det(label, score, box, view=None, grid=1, cut=()):
    return Detection(label, score, tuple(float(v) for v in box), view, grid, cut)


def iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_two_fragments_across_a_tile_boundary_merge_into_their_union():
    # one bus at x 30..80 cut by the boundary between the left tile (x < 56) and the right tile (x >= 44)
    left = det("bus", 0.6, (30, 10, 56, 30), LEFT_TILE, 2, ("right",))
    right = det("bus", 0.8, (44, 10, 80, 30), RIGHT_TILE, 2, ("left",))
    # they share only the 12-px strip: IoU = 240 / 1000, far below 0.5, so plain IoU would count two buses
    assert iou(left.box, right.box) == pytest.approx(0.24)
    [bus] = merge([left, right], 0.5)
    assert bus.box == (30.0, 10.0, 80.0, 30.0) and bus.score == 0.8 and bus.merged == 2 and bus.label == "bus"


def test_fragments_that_disagree_along_the_boundary_stay_apart():
    # same boundary, but y extents 10..30 and 32..50 do not overlap: two different objects
    left = det("bus", 0.6, (30, 10, 56, 30), LEFT_TILE, 2, ("right",))
    right = det("bus", 0.8, (44, 32, 80, 50), (44.0, 26.0, 100.0, 60.0), 2, ("left",))
    assert len(merge([left, right], 0.5)) == 2


def test_different_labels_never_merge():
    a = det("person", 0.9, (10, 10, 40, 50), (0, 0, 100, 60))
    b = det("dog", 0.8, (10, 10, 40, 50), LEFT_TILE, 2)
    assert sorted(d.label for d in merge([a, b], 0.5)) == ["dog", "person"]


def test_duplicates_across_zooms_merge_but_one_window_never_merges_with_itself():
    full = (0.0, 0.0, 100.0, 60.0)
    a = det("person", 0.9, (10, 10, 40, 50), full)
    b = det("person", 0.7, (12, 10, 40, 52), LEFT_TILE, 2)  # IoU = 1120 / 1256 = 0.89
    [m] = merge([a, b], 0.5)
    assert m.box == (10.0, 10.0, 40.0, 52.0) and m.score == 0.9 and m.grid == 1 and m.merged == 2
    # the same two boxes from ONE window: the detector's NMS kept both, so they are two people
    c = det("person", 0.7, (12, 10, 40, 52), full)
    assert len(merge([a, c], 0.5)) == 2


def test_a_cut_fragment_inside_a_whole_box_merges_but_an_uncut_small_box_does_not():
    # 3x3 tiles on 100x60: the first column is x 0..39, the second 31..70 (middle row y 18..42)
    full = (0.0, 0.0, 100.0, 60.0)
    whole = det("bus", 0.9, (30, 20, 95, 28), full)  # 65 x 8 = 520 px
    fragment = det("bus", 0.5, (30, 20, 39, 28), (0.0, 18.0, 39.0, 42.0), 3, ("right",))  # IoU 72 / 520
    tiny = det("bus", 0.5, (60, 22, 66, 26), (31.0, 18.0, 70.0, 42.0), 3)  # IoU 24 / 520, not cut
    assert iou(whole.box, fragment.box) < 0.5 and iou(whole.box, tiny.box) < 0.5
    merged = merge([fragment, whole, tiny], 0.5)
    assert [(d.box, d.merged) for d in merged] == [((30.0, 20.0, 95.0, 28.0), 2),
                                                   ((60.0, 22.0, 66.0, 26.0), 1)]


def test_an_object_cut_in_three_is_one_object_whatever_the_input_order():
    # a 3x3 grid on 100x60 has columns 0..39, 31..70, 61..100; a bus at x 5..95, y 20..28 in the middle row
    cols = [(0.0, 18.0, 39.0, 42.0), (31.0, 18.0, 70.0, 42.0), (61.0, 18.0, 100.0, 42.0)]
    parts = [
        det("bus", 0.3, (5, 20, 39, 28), cols[0], 3, ("right",)),
        det("bus", 0.2, (31, 20, 70, 28), cols[1], 3, ("left", "right")),
        det("bus", 0.4, (61, 20, 95, 28), cols[2], 3, ("left",)),
    ]
    assert iou(parts[0].box, parts[2].box) == 0.0  # the end fragments never touch
    for seed in range(4):
        shuffled = parts[:]
        random.Random(seed).shuffle(shuffled)
        [bus] = merge(shuffled, 0.5)
        assert bus.box == (5.0, 20.0, 95.0, 28.0) and bus.score == 0.4 and bus.merged == 3


def test_a_group_takes_at_most_one_box_per_window_so_neighbours_do_not_chain():
    # two people side by side found in the full image (IoU 0.5, both kept by its NMS), and a tile box
    # matching both: it joins the one it matches best, and the count stays 2
    full = (0.0, 0.0, 100.0, 60.0)
    p1 = det("person", 0.9, (10, 10, 40, 50), full)
    p2 = det("person", 0.8, (20, 10, 50, 50), full)  # IoU(p1, p2) = 800 / 1600 = 0.5
    t = det("person", 0.7, (19, 10, 49, 50), LEFT_TILE, 2)  # IoU with p2 = 0.935, with p1 = 0.54
    merged = merge([p1, p2, t], 0.5)
    assert [(d.box, d.merged) for d in merged] == [((10.0, 10.0, 40.0, 50.0), 1),
                                                   ((19.0, 10.0, 50.0, 50.0), 2)]


def test_merge_of_nothing_and_of_one():
    assert merge([], 0.5) == []
    one = det("cat", 0.5, (1, 2, 3, 4))
    assert merge([one], 0.5) == [one]


# --- summaries and text ----------------------------------------------------------------------------


def test_summarize_counts_means_and_orders_by_confidence():
    dets = [det("person", 0.5, (0, 0, 1, 1)), det("bus", 0.9, (0, 0, 9, 9)), det("person", 0.7, (2, 2, 3, 3))]
    assert summarize(dets) == [
        ObjectSummary("bus", 1, 0.9, [(0.0, 0.0, 9.0, 9.0)]),
        ObjectSummary("person", 2, pytest.approx(0.6), [(2.0, 2.0, 3.0, 3.0), (0.0, 0.0, 1.0, 1.0)]),
    ]
    assert summarize([]) == []


def test_format_objects_is_the_prompt_line():
    objects = [ObjectSummary("person", 2, 0.8, []), ObjectSummary("bus", 1, 0.7, [])]
    line = Regions("x", 10, 10, objects=objects, grids=(2, 3)).describe()
    assert line == "2 person, 1 bus (tiles: 2x2, 3x3)"
    assert Regions("x", 10, 10).describe() == "no objects detected"
    assert Regions("x", 10, 10, grids=(2,)).describe() == "no objects detected (tiles: 2x2)"
    assert "failed" in Regions("x", 0, 0, error="OSError: truncated").describe()


# --- views -----------------------------------------------------------------------------------------------


def test_pad_box_pads_clips_and_rounds_outwards():
    # 40x20 box, 15% = 6 px and 3 px each side
    assert pad_box((10, 10, 50, 30), 0.15, 100, 60) == (4.0, 7.0, 56.0, 33.0)
    # 20x10 box at the bottom-left corner: (-3, 48.5, 23, 61.5) -> clipped (0, 48, 23, 60), 48.5 floored
    assert pad_box((0, 50, 20, 60), 0.15, 100, 60) == (0.0, 48.0, 23.0, 60.0)
    assert pad_box((100, 60, 100, 60), 0.15, 100, 60) == (99.0, 59.0, 100.0, 60.0)  # degenerate: still 1x1


def test_choose_tiles_covers_the_most_unshown_objects_first():
    tiles = [(2, t) for t in TILES_2]
    dets = [det("a", 0.9, (2, 2, 10, 10)), det("b", 0.5, (60, 40, 70, 50)), det("c", 0.5, (80, 40, 90, 50)),
            det("d", 0.99, (0, 0, 100, 60))]  # d fits in no tile
    # top-left holds 0.9; bottom-right holds 0.5 + 0.5 = 1.0 -> first; then top-left; top-right adds nothing
    assert choose_tiles(dets, tiles, 3) == [(2, TILES_2[3]), (2, TILES_2[0])]
    assert choose_tiles(dets, tiles, 1) == [(2, TILES_2[3])]
    assert choose_tiles([], tiles, 2) == []


def test_select_views_gives_full_image_tiles_and_padded_crops():
    image = Image.effect_noise((100, 60), 64).convert("RGB")
    dets = [det("cat", 0.9, (10, 10, 50, 30)), det("dog", 0.4, (0, 50, 20, 60)),
            det("cow", 0.2, (60, 5, 70, 15))]
    config = RegionConfig(grids=(2,), max_tile_views=1, top_k_crops=2, crop_pad=0.15)
    views = select_views(image, dets, config)
    assert [(v.kind, v.box, v.label, v.grid) for v in views] == [
        ("full", (0.0, 0.0, 100.0, 60.0), None, None),
        ("tile", TILES_2[0], None, 2),  # holds the cat (0.9); the bottom-left one holds only the dog (0.4)
        ("crop", (4.0, 7.0, 56.0, 33.0), "cat", None),
        ("crop", (0.0, 48.0, 23.0, 60.0), "dog", None),
    ]
    assert views[0].image is image
    for v in views[1:]:
        assert v.image.size == (v.box[2] - v.box[0], v.box[3] - v.box[1])
        assert v.image.tobytes() == image.crop(tuple(int(c) for c in v.box)).tobytes()


def test_region_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="grids"):
        RegionConfig(grids=(1, 2))
    with pytest.raises(ValueError, match="overlap"):
        RegionConfig(overlap=1.0)


# --- the detector and the stage, end to end ------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Predict on one thread here (what ultralytics itself picks on 2 cores): on our shared 2-core box a
    2-thread predict is up to 10x slower when the other core is busy. Restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def random_yolo():
    torch.manual_seed(0)
    return load_detector("yolov8n.yaml")


@pytest.fixture
def counted(random_yolo, monkeypatch):
    """The random YOLO with its real ``predict`` wrapped to record each call's batch size."""
    calls: list[int] = []
    real = random_yolo.predict

    def predict(source, *args, **kwargs):
        calls.append(len(source))
        return real(source, *args, **kwargs)

    monkeypatch.setattr(random_yolo, "predict", predict)
    return random_yolo, calls


# Random weights score about 1e-4 (the head's prior bias), so the default conf finds nothing; this
# conf makes the random detector fire, which exercises tiling, mapping and merging end to end.
LOW_CONF = RegionConfig(model="yolov8n.yaml", conf=1e-4)


def test_load_detector_offline_fails_fast_without_touching_the_network(monkeypatch):
    import ultralytics.utils.downloads as downloads

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(downloads, "safe_download", no_network)
    with pytest.raises(FileNotFoundError, match=r"'yolov8n\.pt'.*yolov8n\.yaml"):
        load_detector("yolov8n.pt")


def test_load_detector_reads_local_weights_and_fingerprints_them(random_yolo, tmp_path):
    path = tmp_path / "random-yolov8n.pt"
    random_yolo.save(path)
    loaded = load_detector(str(path))
    assert loaded.names == random_yolo.names
    assert detector_fingerprint(loaded).startswith("file:")
    assert detector_fingerprint(random_yolo).startswith("weights:")
    torch.manual_seed(1)
    assert detector_fingerprint(load_detector("yolov8n.yaml")) != detector_fingerprint(random_yolo)


def test_find_end_to_end_on_bus(counted, bus_path):
    from ultralytics.utils import NUM_THREADS

    detector, calls = counted
    detector.predictor = None  # a fresh predictor: its setup is what sets torch's thread count
    before = torch.get_num_threads()
    ours = 2 if NUM_THREADS != 2 else 1  # ultralytics sets NUM_THREADS (1 on 2 cores); ours must differ
    torch.set_num_threads(ours)
    try:
        record = record_from_path(bus_path)
        [regions] = find([record], detector, LOW_CONF)
        assert torch.get_num_threads() == ours, f"ultralytics' predict left torch on {NUM_THREADS} threads"
    finally:
        torch.set_num_threads(before)
    # one call for the full image, one batched call per zoom level: 1 + 4 + 9 images
    assert calls == [1, 4, 9]
    assert regions.error is None and (regions.width, regions.height) == (810, 1080)
    assert regions.grids == (2, 3) and regions.detections, "the low conf should make the random YOLO fire"
    for d in regions.detections:
        assert 0 <= d.box[0] <= d.box[2] <= 810 and 0 <= d.box[1] <= d.box[3] <= 1080
    assert sum(o.count for o in regions.objects) == len(regions.detections)
    assert [v.kind for v in regions.views][0] == "full"
    crops = [v for v in regions.views if v.kind == "crop"]
    assert len(crops) == min(4, len(regions.detections))
    assert regions.describe().endswith("(tiles: 2x2, 3x3)")


def test_tile_detections_map_back_to_the_tile_they_came_from(random_yolo, bus_path):
    image = record_from_path(bus_path).image
    raw = detect(image, random_yolo, LOW_CONF)
    tiled = [d for d in raw if d.grid == 2]
    assert tiled, "expected detections from the 2x2 tiles"
    d = tiled[0]
    assert d.view in tile_boxes(810, 1080, 2, 0.2)
    x0, y0, x1, y1 = d.view
    assert x0 <= d.box[0] <= d.box[2] <= x1 and y0 <= d.box[1] <= d.box[3] <= y1
    # the same tile on its own: the detector's local box plus the tile origin is the mapped box
    with preserved_torch_threads():
        [alone] = random_yolo.predict([image.crop((int(x0), int(y0), int(x1), int(y1)))], imgsz=320,
                                      conf=1e-4, verbose=False)
    local = [tuple(b) for b in alone.boxes.xyxy.tolist()]
    mapped = [to_full_image(b, d.view) for b in local]
    assert any(max(abs(p - q) for p, q in zip(m, d.box, strict=True)) < 1e-2 for m in mapped)


def test_second_find_is_a_cache_hit(counted, bus_path, tmp_path):
    detector, calls = counted
    cache = DiskCache(tmp_path / "cache", namespace="regions")
    record = record_from_path(bus_path)
    [first] = find([record], detector, LOW_CONF, cache)
    assert len(calls) == 3 and cache.stats() == {"hits": 0, "misses": 1}
    [second] = find([record], detector, LOW_CONF, cache)
    assert len(calls) == 3, "a cache hit must not run the detector"
    assert cache.stats() == {"hits": 1, "misses": 1}
    assert second.detections == first.detections
    assert [(v.kind, v.box) for v in second.views] == [(v.kind, v.box) for v in first.views]
    # the merge threshold is not part of the key: merging is redone from the cached raw boxes
    find([record], detector, RegionConfig(model="yolov8n.yaml", conf=1e-4, merge_iou=0.9), cache)
    assert len(calls) == 3
    # a detection parameter is part of it
    find([record], detector, RegionConfig(model="yolov8n.yaml", conf=1e-4, grids=(2,)), cache)
    assert len(calls) == 5 and cache.stats() == {"hits": 2, "misses": 2}


def test_a_corrupt_image_is_recorded_and_the_others_still_run(counted, bus_path):
    detector, calls = counted
    data = bus_path.read_bytes()
    truncated = Image.open(io.BytesIO(data[: len(data) // 3]))  # header reads; pixels fail on load
    bad = ImageRecord("truncated", None, "0" * 64, truncated)
    missing = ImageRecord("missing", None, "1" * 64, None)
    good = record_from_image("drawn", Image.new("RGB", (96, 64), "white"))
    out = find([bad, good, missing], detector, LOW_CONF)
    assert [r.image_id for r in out] == ["truncated", "drawn", "missing"]
    assert out[0].error and "truncated" in out[0].error and (out[0].width, out[0].height) == (810, 1080)
    assert out[0].detections == [] and out[0].views == []
    assert out[2].error and "PIL image" in out[2].error
    assert out[1].error is None and out[1].views[0].kind == "full" and calls == [1, 4, 9]
