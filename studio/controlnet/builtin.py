"""Built-in preprocessors, registered through ``Preprocessors.register`` exactly as an extension would.

Model-free ones (none, invert, canny, shuffle, lineart_standard, tile_resample, binary) are implemented here
with numpy / OpenCV, following the A1111 extension's definitions. Weighted ones wrap controlnet-aux detectors,
built only from files in models/annotators (``from_pretrained(<local folder>, filename=...)`` never downloads
when given a folder; torch.load runs with its safe weights_only default).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .preprocessors import ParamSpec, Preprocessors, resize_short_side


def _np(image: Image.Image, resolution: int) -> np.ndarray:
    return np.asarray(resize_short_side(image, resolution).convert("RGB"))


# ---- model-free ------------------------------------------------------------------------------------

def none(image, resolution, params, model):
    return image


def invert(image, resolution, params, model):
    """White-on-black lines from a black-on-white drawing (what line ControlNets were trained on)."""
    return 255 - _np(image, resolution)


def canny(image, resolution, params, model):
    import cv2
    return cv2.Canny(_np(image, resolution), int(params["low_threshold"]), int(params["high_threshold"]))


def lineart_standard(image, resolution, params, model):
    """The extension's "standard" lineart: how much darker each pixel is than its Gaussian surroundings."""
    import cv2
    x = _np(image, resolution).astype(np.float32)
    g = cv2.GaussianBlur(x, (0, 0), 6.0)
    intensity = np.min(g - x, axis=2).clip(0, 255)
    strong = intensity[intensity > 8]
    intensity /= max(16.0, float(np.median(strong)) if strong.size else 16.0)
    intensity *= 127
    return intensity.clip(0, 255).astype(np.uint8)


def _noise_disk(h: int, w: int, f: int, rng: np.random.Generator) -> np.ndarray:
    import cv2
    noise = rng.uniform(0, 1, size=((h // f) + 2, (w // f) + 2)).astype(np.float64)
    noise = cv2.resize(noise, (w + 2 * f, h + 2 * f), interpolation=cv2.INTER_CUBIC)[f:f + h, f:f + w]
    noise -= noise.min()
    return noise / max(noise.max(), 1e-8)


def shuffle(image, resolution, params, model):
    """Content shuffle (controlnet-aux's ContentShuffleDetector algorithm): a smooth random remap of the
    pixels. Seeded (``seed`` 0) so the same unit gives the same map, which the result cache relies on."""
    import cv2
    x = _np(image, resolution)
    h, w = x.shape[:2]
    rng = np.random.default_rng(int(params.get("seed", 0)))
    flow = np.stack([_noise_disk(h, w, 256, rng) * (w - 1), _noise_disk(h, w, 256, rng) * (h - 1)], axis=2)
    return cv2.remap(x, flow.astype(np.float32), None, cv2.INTER_LINEAR)


def tile_resample(image, resolution, params, model):
    """Tile: the image itself, optionally downsampled (the tile model adds the detail back)."""
    rate = max(1.0, float(params["down_sampling_rate"]))
    if rate <= 1.0:
        return image
    w, h = image.size
    return image.resize((max(1, round(w / rate)), max(1, round(h / rate))), Image.BOX)


def binary(image, resolution, params, model):
    """Black lines -> white on black by a threshold (0 = Otsu), like the extension's "binary"."""
    import cv2
    gray = cv2.cvtColor(_np(image, resolution), cv2.COLOR_RGB2GRAY)
    t = int(params["bin_threshold"])
    flags = cv2.THRESH_BINARY_INV | (cv2.THRESH_OTSU if t in (0, 255) else 0)
    return cv2.threshold(gray, t, 255, flags)[1]


# ---- controlnet-aux (weights in models/annotators) -------------------------------------------------

def _common_root(files: dict[str, Path]) -> tuple[str, dict[str, str]]:
    """One folder all files sit under, and each file relative to it (controlnet-aux joins folder + name)."""
    root = Path(os.path.commonpath([str(p.parent) for p in files.values()]))
    return str(root), {name: str(p.relative_to(root)) for name, p in files.items()}


def _single(cls_path: str, weight: str, **extra):
    def load(files: dict[str, Path]):
        import importlib
        module, cls = cls_path.rsplit(".", 1)
        root, rel = _common_root(files)
        return getattr(importlib.import_module(module), cls).from_pretrained(root, filename=rel[weight], **extra)
    return load


def _openpose_loader(files):
    from controlnet_aux.open_pose import OpenposeDetector
    root, rel = _common_root(files)
    return OpenposeDetector.from_pretrained(root, filename=rel["body_pose_model.pth"],
                                            hand_filename=rel["hand_pose_model.pth"],
                                            face_filename=rel["facenet.pth"])


def _lineart_loader(files):
    from controlnet_aux.lineart import LineartDetector
    root, rel = _common_root(files)
    return LineartDetector.from_pretrained(root, filename=rel["sk_model.pth"], coarse_filename=rel["sk_model2.pth"])


def _leres_loader(files):
    from controlnet_aux.leres import LeresDetector
    root, rel = _common_root(files)
    return LeresDetector.from_pretrained(root, filename=rel["res101.pth"], pix2pix_filename=rel["latest_net_G.pth"])


def _mediapipe_loader(files):
    from controlnet_aux.mediapipe_face import MediapipeFaceDetector
    return MediapipeFaceDetector()


def _aux(**fixed):
    """fn calling a controlnet-aux detector at ``resolution`` with the unit's params mapped by name."""
    rename, ints = fixed.pop("_rename", {}), fixed.pop("_ints", ())

    def fn(image, resolution, params, model):
        kw = {rename.get(k, k): int(v) if k in ints else v for k, v in params.items()}
        return model(image, detect_resolution=resolution, image_resolution=resolution, output_type="pil",
                     **fixed, **kw)
    return fn


def register_builtins(reg: Preprocessors) -> None:
    """Register the built-in preprocessors into ``reg``."""
    r = reg.register
    r("none", none, resolution=None, label="none")
    r("invert", invert, label="invert (from white bg & black line)")
    r("canny", canny, [ParamSpec("low_threshold", "Canny Low Threshold", 1, 255, 100),
                       ParamSpec("high_threshold", "Canny High Threshold", 1, 255, 200)])
    r("shuffle", shuffle)
    r("lineart_standard", lineart_standard, label="lineart_standard (from white bg & black line)")
    r("tile_resample", tile_resample, [ParamSpec("down_sampling_rate", "Down Sampling Rate", 1, 8, 1, 0.01)],
      resolution=None)
    r("binary", binary, [ParamSpec("bin_threshold", "Binary Threshold", 0, 255, 0)])

    r("softedge_hed", _aux(), needs_weights=["ControlNetHED.pth"],
      loader=_single("controlnet_aux.hed.HEDdetector", "ControlNetHED.pth"), model_key="hed")
    r("softedge_hedsafe", _aux(safe=True), needs_weights=["ControlNetHED.pth"],
      loader=_single("controlnet_aux.hed.HEDdetector", "ControlNetHED.pth"), model_key="hed")
    r("softedge_pidinet", _aux(), needs_weights=["table5_pidinet.pth"],
      loader=_single("controlnet_aux.pidi.PidiNetDetector", "table5_pidinet.pth"), model_key="pidinet")
    r("softedge_pidisafe", _aux(safe=True), needs_weights=["table5_pidinet.pth"],
      loader=_single("controlnet_aux.pidi.PidiNetDetector", "table5_pidinet.pth"), model_key="pidinet")
    r("depth_midas", _aux(), needs_weights=["dpt_hybrid-midas-501f0c75.pt"],
      loader=_single("controlnet_aux.midas.MidasDetector", "dpt_hybrid-midas-501f0c75.pt"), model_key="midas")
    r("depth_zoe", _aux(), needs_weights=["ZoeD_M12_N.pt"],
      loader=_single("controlnet_aux.zoe.ZoeDetector", "ZoeD_M12_N.pt"), model_key="zoe")
    r("depth_leres", _aux(_rename={"remove_near": "thr_a", "remove_background": "thr_b"}),
      [ParamSpec("remove_near", "Remove Near %", 0, 100, 0, 0.1),
       ParamSpec("remove_background", "Remove Background %", 0, 100, 0, 0.1)],
      needs_weights=["res101.pth", "latest_net_G.pth"], loader=_leres_loader, model_key="leres")
    pose = ["body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"]
    for name, hand, face in (("openpose", False, False), ("openpose_hand", True, False),
                             ("openpose_face", False, True), ("openpose_full", True, True)):
        r(name, _aux(include_body=True, include_hand=hand, include_face=face), needs_weights=pose,
          loader=_openpose_loader, model_key="openpose")
    r("mlsd", _aux(_rename={"value_threshold": "thr_v", "distance_threshold": "thr_d"}),
      [ParamSpec("value_threshold", "MLSD Value Threshold", 0.01, 2.0, 0.1, 0.01),
       ParamSpec("distance_threshold", "MLSD Distance Threshold", 0.01, 20.0, 0.1, 0.01)],
      needs_weights=["mlsd_large_512_fp32.pth"],
      loader=_single("controlnet_aux.mlsd.MLSDdetector", "mlsd_large_512_fp32.pth"), model_key="mlsd")
    r("normal_bae", _aux(), needs_weights=["scannet.pt"],
      loader=_single("controlnet_aux.normalbae.NormalBaeDetector", "scannet.pt"), model_key="normalbae")
    lineart = ["sk_model.pth", "sk_model2.pth"]
    r("lineart_realistic", _aux(coarse=False), needs_weights=lineart, loader=_lineart_loader, model_key="lineart")
    r("lineart_coarse", _aux(coarse=True), needs_weights=lineart, loader=_lineart_loader, model_key="lineart")
    r("lineart_anime", _aux(), needs_weights=["netG.pth"],
      loader=_single("controlnet_aux.lineart_anime.LineartAnimeDetector", "netG.pth"), model_key="lineart_anime")
    r("mediapipe_face", _aux(_ints=("max_faces",)),
      [ParamSpec("max_faces", "Max Faces", 1, 10, 1), ParamSpec("min_confidence", "Min Face Confidence", 0.01, 1, 0.5,
                                                                0.01)],
      loader=_mediapipe_loader, model_key="mediapipe", requires="mediapipe")
    # names older API scripts still send (the extension keeps the same aliases)
    for old, new in (("hed", "softedge_hed"), ("hed_safe", "softedge_hedsafe"), ("pidinet", "softedge_pidinet"),
                     ("pidinet_safe", "softedge_pidisafe"), ("depth", "depth_midas"), ("depth_zoe", "depth_zoe"),
                     ("lineart", "lineart_realistic"), ("normal_bae", "normal_bae"), ("threshold", "binary"),
                     ("invert (from white bg & black line)", "invert"),
                     ("lineart_standard (from white bg & black line)", "lineart_standard")):
        if old != new:
            reg.alias(old, new)


def default_preprocessors(annotators_dir: str | os.PathLike | None = None, **kw: Any) -> Preprocessors:
    """A registry with every built-in registered (through ``register``, like an extension would)."""
    reg = Preprocessors(annotators_dir, **kw)
    register_builtins(reg)
    return reg
