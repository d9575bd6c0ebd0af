"""The 34 source datasets of MMRS-1M, their release folders, and the sensor of each folder.

MMRS-1M carries no modality field; the folder that names the source dataset in an image path
(`data/<task>/<SOURCE>/...`) is the only signal (paper-digest §3.5, §4.2). `SOURCE_DATASETS` is
the documented table; `SENSOR_BY_SOURCE_PREFIX` is the rule the builder applies, and a test
checks the two agree. Folder names come from third-party readers of the release
(peers-and-datasets §0.1); those marked "likely" were not seen verbatim.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class SourceDataset:
    name: str                # the dataset as the paper names it
    sensor: str              # optical | sar | infrared
    task: str                # MMRS-1M task family it feeds
    folders: tuple[str, ...]  # release folder or annotation-file names seen for it
    note: str = ""


SOURCE_DATASETS = (
    # Captioning (5)
    SourceDataset("NWPU-Captions", "optical", "captioning", ("NWPU", "caption_nwpu")),
    SourceDataset("RSICD", "optical", "captioning", ("RSICD", "caption_rsicd")),
    SourceDataset("RSITMD", "optical", "captioning", ("RSITMD", "caption_rsitmd")),
    SourceDataset("Sydney-Captions", "optical", "captioning", ("Sydney", "caption_syndney"),
                  "the release spells the file 'syndney'"),
    SourceDataset("UCM-Captions", "optical", "captioning", ("UCM", "caption_ucm")),
    # VQA (4)
    SourceDataset("RSVQA-LR", "optical", "vqa", ("RSVQA-LR", "rsvqa_high"),
                  "a third-party loader lists rsvqa_high; unverified"),
    SourceDataset("RSIVQA", "optical", "vqa", ("RSIVQA",)),
    SourceDataset("CRSVQA (MQVQA)", "optical", "vqa", ("MQVQA_dataset", "MQVQA_train")),
    SourceDataset("FloodNet", "optical", "vqa", ("floodnet",), "UAV"),
    # Classification (7)
    SourceDataset("NWPU-RESISC45", "optical", "classification", ("NWPU-RESISC45",)),
    SourceDataset("EuroSAT", "optical", "classification", ("EuroSAT",), "Sentinel-2 RGB"),
    SourceDataset("UC Merced", "optical", "classification", ("UCMerced",)),
    SourceDataset("WHU-RS19", "optical", "classification", ("WHU-RS19",)),
    SourceDataset("RSSCN7", "optical", "classification", ("RSSCN7",)),
    SourceDataset("DSCR", "optical", "classification", ("DSCR",), "fine-grained ships"),
    SourceDataset("FGSCR-42", "optical", "classification", ("FGSCR",), "fine-grained ships"),
    # Visual grounding and region captioning (1)
    SourceDataset("DIOR-RSVG", "optical", "grounding", ("DIOR_RSVG",)),
    # Detection, optical (8)
    SourceDataset("DOTA-v2", "optical", "detection", ("dotav2", "dota")),
    SourceDataset("DIOR", "optical", "detection", ("dior",)),
    SourceDataset("FAIR1M", "optical", "detection", ("FAR1M",), "the release spells 'FAR1M'"),
    SourceDataset("NWPU VHR-10", "optical", "detection", ("NWPUVHR10",)),
    SourceDataset("HRRSD", "optical", "detection", ("HRRSD",)),
    SourceDataset("RSOD", "optical", "detection", ("RSOD",)),
    SourceDataset("UCAS-AOD", "optical", "detection", ("UCAS",)),
    SourceDataset("VisDrone", "optical", "detection", ("VisDrone",), "UAV"),
    # Detection, SAR (3)
    SourceDataset("AIR-SARShip-2.0", "sar", "detection", ("SARV2", "AIR-SARShip-2.0")),
    SourceDataset("SSDD", "sar", "detection", ("SSDD",)),
    SourceDataset("HRSID", "sar", "detection", ("HRSID_HBB", "HRSID_OBB", "HRISD"),
                  "one survey spells it HRISD"),
    # Detection, infrared (6)
    SourceDataset("HIT-UAV", "infrared", "detection", ("HIT-UAV",), "UAV thermal"),
    SourceDataset("Sea-shipping (iRay)", "infrared", "detection", ("IR_ship",), "likely"),
    SourceDataset("Infrared-security (iRay)", "infrared", "detection", ("IR_security",)),
    SourceDataset("Aerial-mancar (iRay)", "infrared", "detection", ("IR_peoplecar",), "likely"),
    SourceDataset("Double-light-vehicle (iRay)", "infrared", "detection", ("IR_streetscene",),
                  "likely"),
    SourceDataset("Oceanic ship", "infrared", "detection",
                  ("infrared_ship_lwir", "infrared_ship_swir", "infrared_ship_fusion"),
                  "likely"),
)

# The rule: sensor of a source folder by case-insensitive name prefix, first match wins,
# anything unmatched is optical. The general prefixes (SAR, IR_, INFRARED) also cover variants
# of the folder names (e.g. SAR-Ship-Dataset, IR_<anything>, infrared_<band>); no optical source
# of the 34 starts with them.
SENSOR_BY_SOURCE_PREFIX = (
    ("HRSID", "sar"),
    ("HRISD", "sar"),
    ("SSDD", "sar"),
    ("SARV2", "sar"),
    ("AIR-SARSHIP", "sar"),
    ("SAR", "sar"),
    ("HIT-UAV", "infrared"),
    ("IR_", "infrared"),
    ("IR-", "infrared"),
    ("INFRARED", "infrared"),
)
SENSORS = ("optical", "sar", "infrared")


def sensor_for_source(source: str) -> str:
    upper = source.upper()
    for prefix, sensor in SENSOR_BY_SOURCE_PREFIX:
        if upper.startswith(prefix):
            return sensor
    return "optical"
