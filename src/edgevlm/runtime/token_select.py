"""Training-free visual token reduction in the runtime's numpy, after the vision encoder (the
graph keeps its fixed shape; `edgevlm export --visual-tokens N --token-select METHOD`).

Two methods, one per family of the literature:

- `divprune` (attention-free; DivPrune, CVPR 2025, as a max-min diversity problem over the
  projected features): cosine distance between the image's token features; the first pick is
  the token farthest from the mean feature, then each next pick is the token whose nearest
  already-picked token is farthest (the greedy 2-approximation of max-min diversity).
- `visionzip` (attention-based; VisionZip, CVPR 2025): the vision graph also outputs each
  token's attention score from the layer whose output the projector reads (LLaVA's
  vision_feature_layer; VisionZip takes the second-to-last). For CLIP that is the attention
  CLS pays to it (averaged over heads), as VisionZip does; SigLIP has no CLS, so the attention
  each token receives averaged over all queries and heads stands in. The N·54/64 highest-scoring
  tokens are kept as dominant tokens; the rest are merged into N·10/64 contextual tokens (at
  least one once N >= 2): evenly spaced remaining tokens are the targets, every other remaining
  token is averaged into the target its feature is closest to (cosine).

Kept tokens keep their order in the image (contextual tokens follow the dominant ones, as in
VisionZip), so position ids stay what the model saw in training.
"""

from __future__ import annotations

import numpy as np

from edgevlm.errors import UserError

METHODS = ("divprune", "visionzip")
DOMINANT_SHARE = 54 / 64  # VisionZip's split of its 64-token setting


def _unit(feats: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(feats, axis=-1, keepdims=True)
    return feats / np.maximum(norms, 1e-12)


def divprune(feats: np.ndarray, keep: int) -> np.ndarray:
    """Indices (ascending) of `keep` of the N rows of `feats` (N, D), chosen for max-min
    cosine diversity."""
    n = feats.shape[0]
    check(keep, n)
    unit = _unit(feats.astype(np.float64))
    mean = _unit(unit.mean(0, keepdims=True))
    first = int(np.argmin(unit @ mean[0]))  # farthest from the mean direction
    chosen = [first]
    nearest = 1.0 - unit @ unit[first]  # (N,) distance to the nearest chosen token
    for _ in range(keep - 1):
        nearest[chosen] = -np.inf
        pick = int(np.argmax(nearest))
        chosen.append(pick)
        nearest = np.minimum(nearest, 1.0 - unit @ unit[pick])
    return np.sort(np.asarray(chosen))


def visionzip(feats: np.ndarray, scores: np.ndarray, keep: int) -> np.ndarray:
    """(keep, D): dominant tokens by attention score, in image order, then contextual tokens
    merged from the rest (see the module docstring)."""
    n = feats.shape[0]
    check(keep, n)
    if keep == n:  # nothing to drop: the image as it is, in its order
        return feats
    contextual = 0 if keep < 2 else max(1, round(keep * (1 - DOMINANT_SHARE)))
    dominant = np.sort(np.argsort(-scores, kind="stable")[: keep - contextual])
    if contextual == 0:
        return feats[dominant]
    rest = np.setdiff1d(np.arange(n), dominant)
    targets = rest[np.linspace(0, len(rest) - 1, contextual).round().astype(int)]
    unit = _unit(feats.astype(np.float64))
    owner = np.argmax(unit[rest] @ unit[targets].T, axis=1)  # (R,) target each token joins
    merged = np.stack([feats[rest[owner == t]].mean(0) for t in range(contextual)])
    return np.concatenate([feats[dominant], merged.astype(feats.dtype)])


def check(keep: int, available: int) -> None:
    if not isinstance(keep, int) or not 1 <= keep <= available:
        raise UserError(f"--visual-tokens {keep} must be between 1 and the tower's "
                        f"{available} image tokens")


def select(method: str, feats: np.ndarray, keep: int, scores: np.ndarray | None = None
           ) -> np.ndarray:
    """(keep, D) image features for the decoder, from one image's (N, D)."""
    if method == "divprune":
        return feats[divprune(feats, keep)]
    if method == "visionzip":
        assert scores is not None, "visionzip needs the vision graph's visual_scores output"
        return visionzip(feats, scores, keep)
    raise UserError(f"--token-select {method!r} is unknown; choose one of {', '.join(METHODS)}")
