"""One-line summaries of the served models' contract, written into each Python model's config
(`parameters { key: "description" }`) so that a plain tritonclient user who reads the model
config learns what `docs/contract.md` says."""

from __future__ import annotations

from cxrlt.contract.ensemble import MEMBERS
from cxrlt.contract.labels import PROJECTIONS

# The served models' names (the model repository contract).
ROUTER_MODEL = "projection_router"
ENCODER_MODEL = "clip_image_encoder"
CLASSIFIER_MODEL = "cxr_classifier"
ZEROSHOT_MODEL = "cxr_zeroshot"
FINDINGS_MODEL = "cxr_findings"
PIPELINE_MODELS = (FINDINGS_MODEL, CLASSIFIER_MODEL, ZEROSHOT_MODEL)


def ensemble_model_name(projection: str, member: str) -> str:
    """The network model of one ensemble member, e.g. ensemble_frontal_pcam."""
    return f"ensemble_{projection}_{member}"


def network_names() -> list[str]:
    """Every Task 1 network model: the router and both projections' members."""
    return [ROUTER_MODEL, *(ensemble_model_name(p, m) for p in PROJECTIONS for m in MEMBERS)]


def served_model_names() -> list[str]:
    """Every model of a built repository: the networks, the CLIP encoder and the pipelines."""
    return [*network_names(), ENCODER_MODEL, *PIPELINE_MODELS]

_IMAGE = (
    "IMAGE UINT16 [1,H,W]: one grayscale radiograph, MONOCHROME2 meaning (higher = brighter; invert MONOCHROME1 "
    "before sending, a raw MONOCHROME1 array gives other answers), full-scale 16-bit (8-bit sources x257)"
)
_HINT = (
    "optional PROJECTION_HINT BYTES [1,1]: DICOM ViewPosition PA|AP (frontal) or LL|RL|LATERAL (lateral), "
    "empty = none, anything else is an error; with trust_hint=true it chooses the ensemble, else the router does"
)
_PROJECTION = "PROJECTION frontal|lateral; PROJECTION_SCORE = the router's probability of the projection used"

MODEL_DESCRIPTIONS: dict[str, str] = {
    "cxr_classifier": f"Task 1, 30 findings. {_IMAGE}; {_HINT}. Out: PROBABILITIES FP32 [30] and LOGITS FP32 [30] "
                      f"in labels.txt order; {_PROJECTION}.",
    "cxr_zeroshot": f"Task 2, 6 zero-shot findings. {_IMAGE}. Out: PROBABILITIES FP32 [6] and SIMILARITIES FP32 [6] "
                    "(mean prompt cosine) in labels.txt order.",
    "cxr_findings": f"All 36 findings in one call. {_IMAGE}; {_HINT}. Out: PROBABILITIES FP32 [36] in labels.txt "
                    f"order (the 30 of Task 1, then the 6 of Task 2); {_PROJECTION}.",
}

# A client's send size "as large as the served networks need": the largest preprocess_size in
# the served configs (cxrlt.client.CxrltClient(send_size=...), `cxrlt classify --send-size`).
SEND_SIZE_SERVED = "served"
