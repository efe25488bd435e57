"""Curation (polyfocus/densefusion/curate.py): SemDeDup against a naive loop of its definition, k-means on planted
clusters with known duplicates, top-k per cluster, the resolution filter, and `polyfocus densefusion curate`."""

import json

import numpy as np
import pytest
from PIL import Image

from polyfocus.densefusion.curate import curate, kmeans, load_embeddings, semdedup, top_k

from test_densefusion_helpers import tiny_clip  # noqa: E402

pytest.importorskip("faiss")


def normalise(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def naive_semdedup(embeddings, assign, centroids, eps):
    """SemDeDup's definition, one pair at a time: farthest-from-centroid first; j is a duplicate when any earlier
    item (kept or not) has cosine > 1 - eps with it."""
    keep = np.ones(len(embeddings), dtype=bool)
    for cluster in set(assign.tolist()):
        members = [i for i in range(len(embeddings)) if assign[i] == cluster]
        members.sort(key=lambda i: (-(1 - float(embeddings[i] @ centroids[cluster])), i))
        for position, j in enumerate(members):
            earlier = [float(embeddings[i] @ embeddings[j]) for i in members[:position]]
            keep[j] = not earlier or max(earlier) <= 1 - eps
    return keep


@pytest.mark.parametrize("eps", [0.4, 0.1, 0.01])
def test_semdedup_matches_its_definition(eps):
    rng = np.random.default_rng(0)
    centres = normalise(rng.normal(size=(5, 16)))
    assign = rng.integers(0, 5, size=300)
    embeddings = normalise(centres[assign] + 0.35 * rng.normal(size=(300, 16))).astype(np.float32)
    embeddings[50] = embeddings[51] = embeddings[7]  # exact copies
    assign[50] = assign[51] = assign[7]
    keep, _ = semdedup(embeddings, assign, centres.astype(np.float32), eps, block=37)  # blocks: a ragged last one
    assert np.array_equal(keep, naive_semdedup(embeddings, assign, centres, eps))
    assert keep[[7, 50, 51]].sum() <= 1  # of exact copies one at most survives (an earlier item may remove it)
    assert (~keep).sum() >= 2 and keep.sum() >= 5  # something removed, something kept


def planted(rng, n_clusters=4, per_cluster=6, dim=32):
    """Orthogonal cluster directions; each item = its direction + its own orthogonal offset (cosine 0.8 with the
    direction, about 0.64 with its siblings); items 1 and 2 of each cluster are near-copies of item 0."""
    basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0].T  # orthonormal rows
    vectors, labels, copies = [], [], []
    for c in range(n_clusters):
        for m in range(per_cluster):
            offset = basis[n_clusters + c * per_cluster + m]
            if m in (1, 2):  # near-copies of item 0
                offset = basis[n_clusters + c * per_cluster] + 1e-3 * rng.normal(size=dim)
                copies.append(len(vectors))
            vectors.append(0.8 * basis[c] + 0.6 * offset)
            labels.append(c)
    return normalise(np.array(vectors)).astype(np.float32), np.array(labels), copies


def test_kmeans_and_semdedup_on_planted_clusters_and_duplicates():
    embeddings, labels, copies = planted(np.random.default_rng(1))
    centroids, assign = kmeans(embeddings, 4, seed=0)
    # the planted clusters come back (up to their numbering)
    assert len({(a, b) for a, b in zip(assign.tolist(), labels.tolist())}) == 4
    keep, max_similarity = semdedup(embeddings, assign, centroids, eps=0.05)  # duplicates: cosine > 0.95
    groups = [[c * 6, c * 6 + 1, c * 6 + 2] for c in range(4)]
    assert all(keep[g].sum() == 1 for g in groups)  # one of each copy group survives
    assert keep.sum() == 24 - 8 and not (~keep)[[i for i in range(24) if i % 6 > 2]].any()
    assert (max_similarity[~keep] > 0.95).all()
    # eps 0.4 (the paper's): cosine > 0.6 is a duplicate, and siblings are ~0.64 apart: only one per cluster stays
    keep, _ = semdedup(embeddings, assign, centroids, eps=0.4)
    assert keep.sum() == 4 and sorted(assign[keep].tolist()) == sorted(set(assign.tolist()))


def test_top_k_ranks_by_centroid_or_semdedup_order():
    embeddings = normalise(np.array([[1.0, 0.05], [1.0, 0.3], [1.0, 0.6], [1.0, 0.9]], dtype=np.float32))
    centroids = normalise(np.array([[1.0, 0.0]], dtype=np.float32))
    assign = np.zeros(4, dtype=np.int64)
    keep = np.array([True, True, False, True])
    assert top_k(embeddings, assign, centroids, keep, 2, "centroid").tolist() == [0, 1]  # closest survivors
    assert top_k(embeddings, assign, centroids, keep, 2, "semdedup").tolist() == [1, 3]  # farthest first
    with pytest.raises(ValueError, match="between 1 and the number of images"):
        kmeans(embeddings, 5)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Twelve images: three colours x (one original + copies), plus two below the resolution floor."""
    root = tmp_path_factory.mktemp("pool")
    (root / "images").mkdir()
    colours = {"red": (220, 30, 30), "blue": (30, 40, 220), "green": (40, 160, 60)}
    names = []
    for colour, rgb in colours.items():
        image = Image.new("RGB", (64, 48), rgb)
        for k in range(3):
            image.save(root / "images" / f"{colour}{k}.png")  # identical: semantic duplicates
            names.append(f"{colour}{k}")
        Image.new("RGB", (64, 48), tuple(255 - v for v in rgb)).save(root / "images" / f"{colour}_inverse.png")
        names.append(f"{colour}_inverse")
    for k in range(2):
        Image.new("RGB", (30, 20), (90, 90, 90)).save(root / "images" / f"tiny{k}.png")
    return root, tiny_clip(tmp_path_factory.mktemp("clip"))


def test_curate_end_to_end_with_clip_embeddings(pool, tmp_path):
    root, clip = pool
    from polyfocus.densefusion.sources import read_items

    items = read_items(root)
    summary = curate(items, str(root), tmp_path, str(clip), clusters=3, eps=1e-4, k=10, min_short_edge=40)
    assert summary["images"] == 14 and summary["after_resolution_filter"] == 12  # the tiny ones are gone
    assert summary["after_semdedup"] == 6  # of each colour's three copies one is left (and the inverses)
    selected = [json.loads(line) for line in (tmp_path / "selected.jsonl").read_text().splitlines()]
    names = [r["image_id"].removeprefix("images/") for r in selected]
    assert len(names) == 6 and not any(n.startswith("tiny") for n in names)
    for colour in ("red", "blue", "green"):
        assert sum(n.startswith(colour) and "inverse" not in n for n in names) == 1
        assert f"{colour}_inverse" in names
    assert all(0 <= r["cluster"] < 3 and r["image_path"].endswith(".png") for r in selected)
    # reclustering from the saved embeddings needs no model and gives the same selection
    again = curate(items, str(root), tmp_path / "again", None, clusters=3, eps=1e-4, k=10, min_short_edge=40,
                   embeddings=load_embeddings(tmp_path / "embeddings.npz"))
    assert again == summary and (tmp_path / "again" / "selected.jsonl").read_text() == \
        (tmp_path / "selected.jsonl").read_text()


def test_curate_cli(pool, tmp_path):
    from polyfocus.cli import main

    root, clip = pool
    main(["densefusion", "curate", "--images", str(root), "--out", str(tmp_path), "--model", str(clip),
          "--clusters", "2", "--top-k", "1", "--min-short-edge", "40"])
    summary = json.loads((tmp_path / "curation.json").read_text())
    assert summary["selected"] == 2 and len((tmp_path / "selected.jsonl").read_text().splitlines()) == 2
    with pytest.raises(SystemExit, match="give --model"):
        main(["densefusion", "curate", "--images", str(root), "--out", str(tmp_path), "--clusters", "2"])
