"""The shipped research bundle: integrity, provenance and a real segmentation.

These tests run the committed model (``Resources/Models/parotid-oar-research-v1``)
on held-out phantoms (seeds never used in training: training uses seeds >= 100000).
The Dice floors are regression guards set below what the bundle measured when it was
committed (see docs/training.md for the full evaluation); they are not accuracy claims.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ParotidOARLib import bundle, cascade, labels, metrics, phantom, roi

# measured on the bundle 1.2.0 (1.3.0 keeps its stage 1 and passes the same floors) on small phantoms seeds 3-left / 7-right /
# 4-right: parotid DSC 0.64 / 0.64 / 0.80, mean OAR DSC 0.93 / 0.86 / 0.93, lowest single OAR 0.85 / 0.65 / 0.88
PAROTID_DSC_FLOOR = 0.50
MEAN_OAR_DSC_FLOOR = 0.75
EACH_OAR_DSC_FLOOR = 0.50

BUNDLE = bundle.models_root() / "parotid-oar-research-v1"

pytestmark = pytest.mark.skipif(not (BUNDLE / "manifest.json").exists(),
                                reason="shipped bundle not present")


def test_bundle_verifies_and_states_provenance():
    manifest = bundle.verify(BUNDLE)  # SHA-256 of every weight file
    assert manifest.clinical_use is False
    text = json.dumps(manifest.to_dict()).lower()
    assert "openkbp" in text and "phantom" in text and "not for clinical use" in text
    assert manifest.labels("stage1") == ["background", labels.PAROTID]
    assert manifest.labels("stage2") == ["background", *labels.OARS]
    size = sum(p.stat().st_size for p in BUNDLE.iterdir())
    assert size < 20 * 2 ** 20


@pytest.fixture(scope="module")
def segmented():
    out = []
    for seed, side in ((3, "left"), (7, "right")):
        case = phantom.generate_case(seed, side=side, size="small")
        result = cascade.run(case.ct, case.geometry, cascade.SegmentOptions(side=side, model_dir=BUNDLE,
                                                                             device="cpu"))
        out.append((case, result))
    return out


def test_shipped_model_segments_held_out_phantoms(segmented):
    for case, result in segmented:
        spacing = case.geometry.spacing_zyx
        parotid = metrics.compare(result.masks[labels.PAROTID], case.labels[labels.PAROTID], spacing)
        assert parotid["dsc"] > PAROTID_DSC_FLOOR, (case.case_id, parotid["dsc"])
        oar_dsc = {name: metrics.compare(result.masks[name], case.labels[name], spacing)["dsc"]
                   for name in labels.OARS}
        assert np.mean(list(oar_dsc.values())) > MEAN_OAR_DSC_FLOOR, (case.case_id, oar_dsc)
        assert min(oar_dsc.values()) > EACH_OAR_DSC_FLOOR, (case.case_id, oar_dsc)


def test_shipped_model_output_respects_the_roi(segmented):
    for case, result in segmented:
        expected_roi = roi.expand(result.masks[labels.PAROTID], case.geometry, labels.ROI_MARGIN_MM_DEFAULT)
        np.testing.assert_array_equal(result.roi, expected_roi)
        for name in labels.OARS:
            assert not (result.masks[name] & ~result.roi).any(), name
