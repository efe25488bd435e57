"""Image curation (`polyfocus densefusion curate`; spec densefusion.md §2): from a big noisy pool to a smaller,
diverse one, as DenseFusion went from LAION-2B to 1M images.

    1. resolution filter: keep images whose short edge is >= min_short_edge (448)
    2. E = normalize(image_embeddings)                                   [N, D]   (CLIP; the paper: EVA-CLIP)
    3. centroids, assign = spherical k-means(E, K)                       faiss, as SemDeDup (K = 50,000 there)
    4. SemDeDup in each cluster: items sorted by distance to the centroid, farthest first ("keep hard"); item j is
       a duplicate if its cosine similarity to any item before it exceeds 1 - eps (eps = 0.4: cosine > 0.6);
       earlier items are compared whether or not they were themselves removed (SemDeDup's upper triangle)
    5. top-k per cluster among the survivors (20)

The paper does not say how "the top 20 images of each cluster" are ranked. Ours (rank="centroid"): the survivors
closest to their centroid, the most representative; rank="semdedup" takes the first k in SemDeDup's own order
(farthest first) instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from polyfocus.data.files import require_local, write_atomic
from polyfocus.experts import Item

RANKS = ("centroid", "semdedup")


def short_edges(items: list[Item], image_root: str) -> list[int]:
    """Each image's short edge, read from its header (no decoding)."""
    edges = []
    for item in items:
        path = os.path.join(image_root, item.image_path)
        try:
            with Image.open(path) as image:
                edges.append(min(image.size))
        except (OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"cannot read image {path} ({type(e).__name__}: {e})") from None
    return edges


@torch.inference_mode()
def embed_images(items: list[Item], image_root: str, model: str, batch_size: int = 32,
                 device: str | None = None) -> np.ndarray:
    """[N, D] L2-normalised image embeddings from a local CLIP(-like) directory: `get_image_features`."""
    from transformers import AutoModel

    from polyfocus.data.images import load_image
    from polyfocus.experts.base import default_device, hf_image_processor, pooled

    device = default_device(device)
    model = require_local(model, "embedding model")
    encoder = AutoModel.from_pretrained(model).to(device).eval()
    processor = hf_image_processor(model)
    chunks = []
    for start in range(0, len(items), batch_size):
        images = [load_image(os.path.join(image_root, item.image_path)) for item in items[start:start + batch_size]]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device)
        features = pooled(encoder.get_image_features(pixel_values=pixels))
        chunks.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy())
    return np.concatenate(chunks)


def kmeans(embeddings: np.ndarray, k: int, niter: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means (faiss): (centroids [K, D], unit norm; each row's cluster [N])."""
    try:
        import faiss
    except ImportError as e:
        raise ImportError("curation needs faiss: pip install 'polyfocus[densefusion]' (faiss-cpu)") from e
    if not 1 <= k <= len(embeddings):
        raise ValueError(f"clusters must be between 1 and the number of images ({len(embeddings)}), got {k}")
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True, verbose=False)
    km.train(x)
    _, assign = km.index.search(x, 1)
    return km.centroids, assign[:, 0]


def semdedup(embeddings: np.ndarray, assign: np.ndarray, centroids: np.ndarray, eps: float,
             block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(keep [N] bool, max_similarity [N]: each item's highest cosine to an item before it in its cluster's order,
    -1 for the first). Order within a cluster: distance to the centroid, descending; ties by index."""
    keep = np.ones(len(embeddings), dtype=bool)
    max_similarity = np.full(len(embeddings), -1.0, dtype=np.float32)
    for cluster in np.unique(assign):
        members = cluster_order(embeddings, assign, centroids, cluster)
        e = torch.from_numpy(np.ascontiguousarray(embeddings[members], dtype=np.float32))  # [n, D]
        best = torch.full((len(members),), -1.0)
        for start in range(0, len(members), block):  # columns j of the upper triangle, a block at a time
            sims = e[: start + block] @ e[start:start + block].T  # [i <= last j, j in block]
            i = torch.arange(sims.shape[0])[:, None]
            j = torch.arange(start, start + sims.shape[1])[None, :]
            sims = sims.masked_fill(i >= j, -1.0)  # only items before j
            best[start:start + block] = sims.max(dim=0).values
        max_similarity[members] = best.numpy()
        keep[members] = best.numpy() <= 1 - eps
    return keep, max_similarity


def cluster_order(embeddings: np.ndarray, assign: np.ndarray, centroids: np.ndarray, cluster: int) -> np.ndarray:
    """The cluster's member indices, farthest from the centroid first (SemDeDup's "keep hard")."""
    members = np.flatnonzero(assign == cluster)
    distance = 1 - embeddings[members] @ centroids[cluster]
    return members[np.argsort(-distance, kind="stable")]


def top_k(embeddings: np.ndarray, assign: np.ndarray, centroids: np.ndarray, keep: np.ndarray, k: int,
          rank: str = "centroid") -> np.ndarray:
    """The selected indices (ascending): per cluster, k survivors by `rank`."""
    if rank not in RANKS:
        raise ValueError(f"rank must be one of {RANKS}, got {rank!r}")
    selected = []
    for cluster in np.unique(assign):
        order = [i for i in cluster_order(embeddings, assign, centroids, cluster) if keep[i]]
        if rank == "centroid":
            order = order[::-1]  # closest first; within equal distance, the stable order reversed is fine
        selected += order[:k]
    return np.array(sorted(selected), dtype=np.int64)


def curate(items: list[Item], image_root: str, out: str | os.PathLike, model: str | None, clusters: int,
           eps: float = 0.4, k: int = 20, min_short_edge: int = 448, rank: str = "centroid", seed: int = 0,
           embeddings: dict[str, np.ndarray] | None = None, batch_size: int = 32, device: str | None = None) -> dict:
    """Write out/selected.jsonl (the chosen images, input order, with their cluster), out/curation.json and
    out/embeddings.npz (image_ids, embeddings: pass it back as `embeddings` to recluster without the model)."""

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    large = [item for item, edge in zip(items, short_edges(items, image_root)) if edge >= min_short_edge]
    if not large:
        raise ValueError(f"no image has a short edge of {min_short_edge} px or more")
    if embeddings is None:
        if model is None:
            raise ValueError("give an embedding model (a local CLIP directory) or precomputed embeddings")
        vectors = embed_images(large, image_root, model, batch_size, device)
    else:
        missing = [item.image_id for item in large if item.image_id not in embeddings]
        if missing:
            raise ValueError(f"no embedding for {len(missing)} image(s), e.g. {missing[0]!r}")
        vectors = np.stack([embeddings[item.image_id] for item in large]).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    np.savez(out / "embeddings.npz", image_ids=np.array([item.image_id for item in large]), embeddings=vectors)
    centroids, assign = kmeans(vectors, clusters, seed=seed)
    keep, _ = semdedup(vectors, assign, centroids, eps)
    chosen = top_k(vectors, assign, centroids, keep, k, rank)
    lines = []
    for i in chosen:
        similarity = float(vectors[i] @ centroids[assign[i]])
        lines.append(json.dumps({**large[i].source(), "cluster": int(assign[i]),
                                 "centroid_similarity": round(similarity, 6)}, ensure_ascii=False) + "\n")
    write_atomic(out / "selected.jsonl", "".join(lines))
    summary = {"images": len(items), "after_resolution_filter": len(large), "clusters": clusters,
               "after_semdedup": int(keep.sum()), "selected": len(chosen), "eps": eps, "top_k": k,
               "min_short_edge": min_short_edge, "rank": rank}
    write_atomic(out / "curation.json", json.dumps(summary, indent=1))
    return summary


def load_embeddings(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """An embeddings.npz written by `curate` (or any npz with `image_ids` and `embeddings` [N, D])."""
    data = np.load(path)
    return dict(zip((str(i) for i in data["image_ids"]), data["embeddings"]))
