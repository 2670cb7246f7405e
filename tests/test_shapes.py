import hashlib
from collections import Counter

import numpy as np
import pytest

from refine.images import shapes
from refine.images.shapes import (
    CELL,
    COLOURS,
    GRID,
    LABELS,
    canonical_objects,
    cell_box,
    describe,
    lazy_records,
    make_scenes,
    parse_spec,
    records,
    split_of,
)


def _pixels(scene) -> bytes:
    return scene.image.tobytes()


def test_same_seed_same_scenes_and_prefix_stability():
    a, b = make_scenes(12, seed=3), make_scenes(12, seed=3)
    assert [_pixels(s) for s in a] == [_pixels(s) for s in b]
    assert [(s.id, s.caption, s.items, s.objects) for s in a] == [(s.id, s.caption, s.items, s.objects) for s in b]
    # The first N scenes do not depend on how many are asked for ("shapes:N" = a prefix).
    assert [_pixels(s) for s in make_scenes(5, seed=3)] == [_pixels(s) for s in a[:5]]
    other = make_scenes(12, seed=4)
    assert sum(_pixels(x) == _pixels(y) for x, y in zip(a, other, strict=True)) == 0


def test_splits_are_disjoint_by_pixels_and_ids():
    train = make_scenes(400, "train")
    heldout = make_scenes(400, "heldout")
    train_hashes = {hashlib.sha256(_pixels(s)).hexdigest() for s in train}
    heldout_hashes = {hashlib.sha256(_pixels(s)).hexdigest() for s in heldout}
    assert not train_hashes & heldout_hashes
    assert not {s.id for s in train} & {s.id for s in heldout}
    # The split rule holds for every image, so no seed or size can make a held-out image a training one.
    assert all(split_of(s.image) == "train" for s in train)
    assert all(split_of(s.image) == "heldout" for s in heldout)
    assert all(s.id.startswith("shapes-heldout-s0-") for s in heldout)


@pytest.mark.parametrize(
    "objects, caption",
    [
        ({"red circle": 2, "blue square": 1}, "two red circles and a blue square"),
        ({"green triangle": 1}, "a green triangle"),
        ([("green triangle", 1), ("yellow square", 3), ("red circle", 1)], "a green triangle, three yellow squares and a red circle"),
        ({"blue circle": 6, "red square": 1, "green circle": 1, "yellow triangle": 1},
         "six blue circles, a red square, a green circle and a yellow triangle"),
    ],
)
def test_grammar_on_hand_made_objects(objects, caption):
    assert describe(objects) == caption


@pytest.mark.parametrize(
    "bad, match",
    [({}, "at least one"), ({"purple circle": 1}, "purple circle"), ({"red circle": 0}, "red circle"),
     ({"red circle": 10}, "1..9"), ([("red circle", 1), ("red circle", 2)], "once")],
)
def test_grammar_rejects_bad_objects(bad, match):
    with pytest.raises(ValueError, match=match):
        describe(bad)


def test_canonical_order_is_first_cell_row_major():
    # Neither alphabetical nor the order given: yellow (cell 0) < blue (cell 3) < red (cell 4).
    items = [("blue", "square", 8), ("red", "triangle", 4), ("yellow", "circle", 0), ("blue", "square", 3)]
    objects = canonical_objects(items)
    assert list(objects.items()) == [("yellow circle", 1), ("blue square", 2), ("red triangle", 1)]
    assert describe(objects) == "a yellow circle, two blue squares and a red triangle"


def _fill_ratio(mask: np.ndarray) -> tuple[float, int, int, tuple[int, int, int, int]]:
    ys, xs = np.nonzero(mask)
    top, bottom, left, right = ys.min(), ys.max(), xs.min(), xs.max()
    h, w = bottom - top + 1, right - left + 1
    return mask.sum() / (h * w), h, w, (left, top, right, bottom)


def test_annotations_agree_with_the_drawn_pixels():
    """Per cell: only the annotated colour is drawn, it lies inside the cell, and its fill ratio says its shape."""
    shape_ratio = {"square": (0.99, 1.01), "circle": (0.70, 0.88), "triangle": (0.45, 0.66)}
    for scene in make_scenes(150, seed=1):
        pixels = np.asarray(scene.image)
        by_cell = {cell: (colour, shape) for colour, shape, cell in scene.items}
        assert len(by_cell) == len(scene.items)  # one object per cell
        assert scene.objects == dict(Counter(f"{c} {s}" for c, s, _ in scene.items))
        assert scene.caption == describe(scene.objects)
        assert [cell for _, _, cell in scene.items] == sorted(by_cell)
        assert list(scene.objects) == list(dict.fromkeys(f"{c} {s}" for c, s, _ in scene.items))  # first-cell order
        for cell in range(GRID * GRID):
            left, top, right, bottom = cell_box(cell)
            patch = pixels[top:bottom, left:right]
            colour_masks = {name: (patch == rgb).all(-1) for name, rgb in COLOURS.items()}
            painted = (patch != shapes.BACKGROUND).any(-1)
            if cell not in by_cell:
                assert not painted.any(), f"{scene.id}: cell {cell} should be empty"
                continue
            colour, shape = by_cell[cell]
            mask = colour_masks[colour]
            assert (mask == painted).all(), f"{scene.id}: cell {cell} has pixels of another colour"
            ratio, h, w, (x0, y0, x1, y1) = _fill_ratio(mask)
            lo, hi = shape_ratio[shape]
            assert lo <= ratio <= hi, f"{scene.id}: cell {cell} {shape} fills {ratio:.2f} of its box"
            assert shapes.MIN_SIZE <= w <= shapes.MAX_SIZE and h == w
            assert x0 >= 2 and y0 >= 2 and x1 <= CELL - 3 and y1 <= CELL - 3  # 2-px margin: never touching


def test_sparse_scenes_dominate_and_object_range_is_respected():
    counts = Counter(len(s.items) for s in make_scenes(600))
    assert set(counts) == {1, 2, 3, 4, 5, 6}
    assert sum(counts[k] for k in (1, 2, 3)) / 600 > 0.6
    assert counts[1] > counts[3] > counts[6]
    dense = make_scenes(40, objects=(4, 6))
    assert {len(s.items) for s in dense} <= {4, 5, 6}
    assert all(s.id.endswith("-o46") for s in dense)
    labels = {label for s in make_scenes(300) for label in s.objects}
    assert labels == set(LABELS)  # 3 shapes x 4 colours all occur


def test_records_carry_annotations_and_reference():
    import io

    scenes = make_scenes(3, "heldout")
    recs = records(scenes)
    for scene, rec in zip(scenes, recs, strict=True):
        assert rec.id == scene.id and rec.path is None
        assert rec.objects == scene.objects and rec.references == [scene.caption]
        buf = io.BytesIO()
        scene.image.save(buf, format="PNG")
        assert rec.sha256 == hashlib.sha256(buf.getvalue()).hexdigest()
        assert rec.image.tobytes() == scene.image.tobytes()


def test_lazy_records_draw_the_same_scenes_on_demand():
    from refine.images.records import PIXELS

    eager, lazy = records(make_scenes(3, "heldout")), lazy_records(3, "heldout")
    assert [(r.id, r.sha256, r.objects, r.references) for r in lazy] == \
        [(r.id, r.sha256, r.objects, r.references) for r in eager]
    assert all(callable(r.source) for r in lazy)  # no pixels held by the record itself
    before = PIXELS.decodes
    assert [r.image.tobytes() for r in lazy] == [r.image.tobytes() for r in eager]
    assert PIXELS.decodes == before + 3


def test_parse_spec():
    assert parse_spec("shapes:12") == ("train", 12, 0)
    assert parse_spec("shapes-heldout:500") == ("heldout", 500, 0)
    assert parse_spec("shapes-train:7") == ("train", 7, 0)
    assert parse_spec("shapes") == ("train", shapes.DEFAULT_SCENES["train"], 0)
    assert parse_spec("shapes-heldout") == ("heldout", shapes.DEFAULT_SCENES["heldout"], 0)
    assert parse_spec("shapes-val:30") == ("train", 30, shapes.VALIDATION_SEED)


def test_the_validation_set_is_new_scenes_of_the_training_split():
    """Never a held-out scene (the split is by image hash); a fresh generator seed, so only the few
    one-object scenes that any draw can repeat coincide with the loop's training scenes."""
    from refine.images import load_images

    records = load_images("shapes-val:480").records
    val = {r.sha256 for r in records}
    train = {r.sha256 for r in load_images("shapes:300").records}
    heldout = {r.sha256 for r in load_images("shapes-heldout:480").records}
    assert len(records) == 480 and not val & heldout
    assert len(val & train) <= 0.02 * len(val)
    for bad in ("shapes:", "shape:3", "shapes:-1", "shapes-test:3", "shapes:3x"):
        with pytest.raises(ValueError, match="shapes-heldout:N"):
            parse_spec(bad)


def test_make_scenes_rejects_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        make_scenes(1, split="test")
    with pytest.raises(ValueError, match="objects"):
        make_scenes(1, objects=(0, 3))
    with pytest.raises(ValueError, match="objects"):
        make_scenes(1, objects=(4, 10))
    with pytest.raises(ValueError, match="n="):
        make_scenes(-1)
    assert make_scenes(0) == []


def test_captions_read_back_exactly_with_the_world_vocabulary():
    """The grounded critic's parser (refine.objects) reads every generated caption as its annotations."""
    from refine.objects import compare, mentions

    vocab = shapes.vocabulary()
    for scene in make_scenes(200, "heldout"):
        assert mentions(scene.caption, vocab) == scene.objects
        assert compare(scene.caption, scene.objects, vocab).exact
    # An absent object is still seen: the vocabulary is the whole world, not the scene's labels.
    assert compare("a red circle and a blue square", {"red circle": 1}, vocab).hallucinated == ["blue square"]
