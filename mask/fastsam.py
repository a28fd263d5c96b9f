"""FastSAM (Zhao et al. 2023) through the ultralytics package: load a .pt, segment an image into
masks of its own size. Nothing is downloaded: ultralytics runs offline (YOLO_OFFLINE) and never
installs packages (YOLO_AUTOINSTALL), unless the user set those variables otherwise.

A .pt is a pickle, which runs code when it loads: the node lists and loads files only from the
models folders the pack registers; a file should come from a source the user trusts.
"""

import os
from dataclasses import dataclass

import numpy as np
import torch

ULTRALYTICS_PIN = "ultralytics==8.4.190"
DEFAULTS = {"imgsz": 1024, "conf": 0.4, "iou": 0.9}  # FastSAM's README


class FastSAMError(ValueError):
    pass


def _ultralytics():
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "False")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    try:
        import ultralytics
    except ImportError as error:
        raise FastSAMError(f"FastSAM needs the ultralytics package ({error}): pip install {ULTRALYTICS_PIN} "
                           "(the pack's requirements.txt)") from None
    return ultralytics


@dataclass(frozen=True)
class FastSAMModel:
    """A loaded FastSAM network and the file it came from."""

    model: object  # ultralytics.FastSAM
    name: str

    def segment(self, image: np.ndarray, device: torch.device, imgsz: int = 1024, conf: float = 0.4,
                iou: float = 0.9) -> torch.Tensor:
        """(N, H, W) bool masks of an RGB uint8 image (H, W, 3), at its own size."""
        results = self.model.predict(np.ascontiguousarray(image[..., ::-1]), device=str(device), retina_masks=True,
                                     imgsz=imgsz, conf=conf, iou=iou, verbose=False, save=False)
        masks = results[0].masks
        height, width = image.shape[:2]
        if masks is None:
            return torch.zeros((0, height, width), dtype=torch.bool)
        data = masks.data.to("cpu") > 0.5
        if data.shape[-2:] != (height, width):  # retina masks have the image's size; make sure
            data = torch.nn.functional.interpolate(data[None].float(), (height, width), mode="nearest")[0] > 0.5
        return data

    def offload(self) -> None:
        self.model.to("cpu")


def load_fastsam(path: str, name: str) -> FastSAMModel:
    """A FastSAM (YOLOv8-seg) checkpoint, with errors that say what the file is not."""
    ultralytics = _ultralytics()
    try:
        model = ultralytics.FastSAM(path)
    except Exception as error:  # a truncated zip, a foreign pickle, a state dict without a network
        raise FastSAMError(f"model_name: {name} is not a FastSAM checkpoint ultralytics can load "
                           f"({type(error).__name__}: {str(error)[:200]}); use FastSAM-s.pt or FastSAM-x.pt") from None
    network = getattr(model, "model", None)
    head = network.model[-1] if network is not None and hasattr(network, "model") else None
    if type(head).__name__ != "Segment":
        raise FastSAMError(f"model_name: {name} holds a {type(head).__name__ if head is not None else 'non-YOLO'} "
                           "network, not FastSAM's segmentation head (YOLOv8-seg): use FastSAM-s.pt or FastSAM-x.pt")
    return FastSAMModel(model, name)


def random_fastsam_checkpoint(path: str, scale: str = "s", seed: int = 0) -> None:
    """A FastSAM-architecture checkpoint with random weights (YOLOv8-seg, one class, built from
    ultralytics' own yaml), saved the way ultralytics saves trained models: for tests and demos.
    Its boxes are arbitrary and each mask fills its box (every box scores about 0.5), so every
    image gets many segments."""
    _ultralytics()
    from ultralytics.nn.tasks import SegmentationModel

    torch.manual_seed(seed)
    network = SegmentationModel(f"yolov8{scale}-seg.yaml", nc=1, verbose=False)
    head = network.model[-1]
    for branch in head.cv3:  # class logits at 0 (not YOLO's rare-object prior): segments appear
        torch.nn.init.zeros_(branch[-1].bias)
    torch.nn.init.constant_(head.proto.cv3.bn.bias, 5.0)  # positive prototypes and coefficients:
    for branch in head.cv4:  # each mask fills its box, so boxes and points find segments
        torch.nn.init.constant_(branch[-1].bias, 1.0)
    network.names = {0: "object"}
    checkpoint = {"model": network.half(), "train_args": {"task": "segment", "imgsz": 1024}, "epoch": -1,
                  "date": "random weights", "version": ULTRALYTICS_PIN.split("==")[1]}
    partial = f"{path}.partial"
    torch.save(checkpoint, partial)
    os.replace(partial, path)
