"""One description of any model source, for ``unetflow model info`` (issue 19).

A unetflow checkpoint and a bioimage.io package are described by the same keys first
(``COMMON``: dims, channels, classes, valid sizes, margin, halo, receptive field,
pre- and postprocessing), then what only that kind has (the checkpoint's spec and
parameters; the package's name, axes and weight formats).
"""

from __future__ import annotations

from typing import Any

COMMON = ("source", "dims", "in_channels", "classes", "padding", "valid_sizes", "margin", "halo", "receptive_radius",
          "receptive_field", "preprocessing", "postprocessing")


def summarise(path: str, *, probe: bool = False, trust_code: bool = False) -> dict[str, Any]:
    """The description of the model at *path*, ``COMMON`` keys first.

    *probe*: measure the receptive field with an impulse response (loads the weights).
    A package's ``same`` net without a declared halo has no receptive field until probed.
    """
    from unetflow.model import zoo
    from unetflow.model.predictor import model_source

    if isinstance(model_source(path), zoo.PackageSource):  # refuses a missing package or a folder without one
        return _package(path, probe=probe, trust_code=trust_code)
    return _checkpoint(path, probe=probe)


def _checkpoint(path: str, *, probe: bool) -> dict[str, Any]:
    from unetflow.model.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    spec, geometry = ckpt.spec, ckpt.net.geometry
    norm = spec.norm
    out: dict[str, Any] = {
        "source": f"unetflow checkpoint {path}", "dims": spec.dims, "in_channels": spec.in_channels, "classes": spec.classes,
        "padding": spec.padding, "valid_sizes": f"{geometry.min_input} + k*{geometry.input_multiple}", "margin": geometry.margin,
        "halo": f"crop halo >= {geometry.receptive_radius}" if spec.padding == "same" else "none (valid: the margin)",
        "receptive_radius": geometry.receptive_radius, "receptive_field": geometry.receptive_field,
        "preprocessing": norm.kind + (f" {norm.low}..{norm.high}" if norm.kind == "percentile" else "") + " (dataset-wide, per channel)",
        "postprocessing": "softmax" if spec.classes > 1 else "sigmoid",
        "unetflow version": ckpt.unetflow_version,
    }
    out.update({k: v for k, v in spec.to_dict().items() if k not in out})
    out.update({k: v for k, v in geometry.describe().items() if k not in out})
    out["parameters"] = sum(p.numel() for p in ckpt.net.parameters())
    if probe:
        from unetflow.model.unet import probe_receptive_radius

        out["probed radius"] = probe_receptive_radius(ckpt.net)
    return out


def _package(path: str, *, probe: bool, trust_code: bool) -> dict[str, Any]:
    from unetflow.model import zoo

    info = zoo.package_info(path)
    step = 0 if info["fixed_size"] else info["input_multiple"]
    radius: Any = "probe it (--probe)"
    if info["padding"] == "valid":
        radius = info["margin"] + info["input_multiple"] - 1
    elif info["declared_halo"]:
        radius = info["declared_halo"]
    elif info["known_radius"] is not None:
        radius = info["known_radius"]  # a U-Net unetflow exported: its geometry, exactly
    if probe:
        net = zoo.PackageSource(path, trust_code=trust_code).load()
        radius = net.geometry.receptive_radius
        info["probed radius"] = zoo.probe_radius(net, net.geometry)
    out: dict[str, Any] = {
        "source": f"bioimage.io package {path}", "dims": info["dims"], "in_channels": info["in_channels"], "classes": info["classes"],
        "padding": info["padding"], "valid_sizes": f"{info['min_input']} + k*{step}" if step else f"{info['min_input']} only",
        "margin": info["margin"], "halo": info["declared_halo"] or ("crop halo >= the receptive radius" if info["padding"] == "same" else "none"),
        "receptive_radius": radius, "receptive_field": 2 * radius + 1 if isinstance(radius, int) else radius,
        "preprocessing": info["preprocessing"], "postprocessing": info["postprocessing"],
    }
    out.update({k: v for k, v in info.items() if k not in out})
    return out
