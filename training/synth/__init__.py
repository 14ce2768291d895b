"""Synthetic woven fabric with realistic defects, written in the AITEX folder layout.

The generator is for the tests, the demo and anyone without real data. It draws grey woven
strips (plain and twill weaves with uneven yarns, slubs, weft bow, illumination drift and
sensor noise) that look like the AITEX line-scan strips, adds white padding at one end of about a
third of them, and paints one textile-shaped defect on each defective strip.

One module per job:

- :mod:`training.synth.fabric`: the look of a fabric and its defect-free strips
  (:func:`sample_fabric_params`, :func:`make_fabric`);
- :mod:`training.synth.defects`: the defect kinds and their masks (:func:`add_defect`; the mask
  rule is in that module);
- :mod:`training.synth.strip`: a strip with padding and at most one defect (:func:`make_strip`);
  defects never touch padding nor the margin next to it;
- :mod:`training.synth.writer`: the folder layout, the manifest and the summary
  (:func:`generate_dataset`).

:func:`make_fabric`, :func:`sample_fabric_params` and :func:`add_defect` are the building blocks;
anomaly synthesis for training (DRAEM) can reuse them on tiles.
"""

from training.synth.defects import DEFECT_KINDS, MASK_DELTA, add_defect
from training.synth.fabric import WEAVES, FabricParams, make_fabric, sample_fabric_params
from training.synth.strip import EDGE_MARGIN, Strip, make_strip
from training.synth.writer import MANIFEST_NAME, NORMAL_CODE, SynthSummary, generate_dataset

__all__ = [
    "DEFECT_KINDS",
    "EDGE_MARGIN",
    "MANIFEST_NAME",
    "MASK_DELTA",
    "NORMAL_CODE",
    "WEAVES",
    "FabricParams",
    "Strip",
    "SynthSummary",
    "add_defect",
    "generate_dataset",
    "make_fabric",
    "make_strip",
    "sample_fabric_params",
]
