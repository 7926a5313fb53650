"""Issue 18: OME-Zarr outputs open right in the readers viewers use.

The input is written by ome-zarr-py's own multiscale writer (levels with scale and
translation); outputs are read by ome-zarr-models (validation), ome-zarr-py's Reader,
tensorstore, zarr-python (no listing warnings) and, where installed, napari with
napari-ome-zarr (headless: a ViewerModel, no window).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from unetflow import formats, resume
from unetflow.cli import main
from unetflow.config import ClusterSpec, OutputSettings, RunConfig, TilingSpec
from unetflow.errors import ConfigError, InputFormatError
from unetflow.formats import omeroot
from unetflow.model.testing import ScaleNetSource
from unetflow.run import segment
from unetflow.sample import make_sample
from unetflow.train.targets import instance_to_classes

ome_writer = pytest.importorskip("ome_zarr.writer")
ome_io = pytest.importorskip("ome_zarr.io")
ome_reader = pytest.importorskip("ome_zarr.reader")
v05 = pytest.importorskip("ome_zarr_models.v05")
ts = pytest.importorskip("tensorstore")

AXES = [{"name": "c", "type": "channel"}] + [{"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"]
VOXEL = {"c": 1.0, "z": 2.0, "y": 0.5, "x": 0.5}


def write_input(path, data):
    """An OME-Zarr 0.5 image of (C, Z, Y, X) *data* in three levels (y, x halved twice), by ome-zarr-py."""
    group = zarr.open_group(str(path), mode="w")
    ome_writer.write_image(data, group, axes=AXES, scale_factors=(2, 4), scale=VOXEL, storage_options={"chunks": (1, 4, 16, 16)})
    return str(path)


def class_input(tmp_path):
    """Two channels: a smooth blob as channel 1, its complement as channel 0 (argmax: objects of class 1)."""
    _, y, x = np.meshgrid(np.arange(12), np.arange(40), np.arange(36), indexing="ij")
    fg = (np.sin(y / 4.0) * np.cos(x / 5.0) > 0.3).astype(np.float32)
    return write_input(tmp_path / "raw.ome.zarr", np.stack([1 - fg, fg]))


def instance_input(tmp_path):
    """Soft background / interior / border probabilities of sample objects."""
    _, truth = make_sample((12, 40, 36), seed=3)
    classes = instance_to_classes(truth)
    probs = np.stack([(classes == k).astype(np.float32) for k in range(3)])
    return write_input(tmp_path / "objects.ome.zarr", probs)


def run(inp, out, *, kind, level=None, image="copy", channels=2, overwrite=True, resume_=False):
    config = RunConfig(
        input=str(inp), output=str(out), model="(oracle)", level=level, resume=resume_,
        tiling=TilingSpec(block_shape=(4, 16, 16), patch_shape=(4, 8, 8), batch_size=8),
        output_settings=OutputSettings(kind=kind, overwrite=overwrite, image=image, chunk_shape=(4, 16, 16)),
        cluster=ClusterSpec(kind="inline"),
    )
    return segment(config, source=ScaleNetSource(factor=1.0, dims=3, channels=channels), progress=False)


def ome(path):
    return dict(zarr.open_group(str(path), mode="r").attrs)["ome"]


def transforms(ms, k):
    """(scale, translation) of level *k* of a multiscales entry."""
    out = {t["type"]: t[t["type"]] for t in ms["datasets"][k]["coordinateTransformations"]}
    return out["scale"], out.get("translation", [0.0] * len(out["scale"]))


def every_array(path):
    group = zarr.open_group(str(path), mode="r")
    return [name for name, node in group.members(max_depth=None) if isinstance(node, zarr.Array)]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """A labels and an instances output of OME-Zarr inputs (levels 1 and 0), image copied to the root."""
    tmp = tmp_path_factory.mktemp("viewers")
    labels = tmp / "labels.ome.zarr"
    run(class_input(tmp), labels, kind="labels", level=1)
    instances = tmp / "instances.ome.zarr"
    run(instance_input(tmp), instances, kind="instances", channels=3)
    return {"labels": labels, "instances": instances, "tmp": tmp}


@pytest.mark.parametrize("kind", ["labels", "instances"])
def test_root_is_image_plus_labels_for_every_reader(outputs, kind):
    out = outputs[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # zarr warns on anything in the store that is not Zarr (the old .unetflow/)
        names = every_array(out)
    assert not os.path.exists(out / resume.RUN_DIR) and resume.RunDir(str(out)).run_file.exists()
    root = zarr.open_group(str(out), mode="r")
    image = v05.Image.from_zarr(root)  # validates the root, its labels group and label levels == image levels
    assert image.labels is not None and image.labels.label_paths == ["segmentation"]
    v05.ImageLabel.from_zarr(root["labels/segmentation"])
    for name in names:  # tensorstore reads every array unetflow wrote
        got = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(out / name)}}).result().read().result()
        np.testing.assert_array_equal(got, zarr.open_array(str(out / name), mode="r")[...])
    nodes = list(ome_reader.Reader(ome_io.parse_url(str(out)))())
    specs = [{type(s).__name__ for s in n.specs} for n in nodes]
    assert "Multiscales" in specs[0] and any("Label" in s for s in specs)
    label = nodes[next(i for i, s in enumerate(specs) if "Label" in s)]
    data = np.asarray(label.data[0])
    assert data.max() > 0  # objects, not an empty map
    colors = label.metadata["color"]
    if kind == "labels":  # every class listed, 0 transparent, the objects opaque
        assert set(colors) == {0, 1} and colors[0][3] == 0 and colors[1][3] == 1
        assert label.metadata["properties"][1] == {"class": "class 1"}
    else:  # no partial list: the viewer's own colormap colours every id
        assert colors == {}


def test_label_levels_follow_the_input_levels_they_were_computed_from(outputs):
    out = outputs["labels"]
    inp = ome(outputs["tmp"] / "raw.ome.zarr")["multiscales"][0]
    root, label = ome(out)["multiscales"][0], ome(out / "labels/segmentation")["multiscales"][0]
    assert len(root["datasets"]) == len(label["datasets"]) == 2  # input levels 1 and 2
    for k in range(2):
        s_in, t_in = transforms(inp, k + 1)
        assert transforms(root, k) == (s_in, t_in)  # the image at the root is the input from level 1 on
        assert transforms(label, k)[0] == s_in[1:]  # the labels' voxels are the input level's
    assert transforms(label, 0)[1] == transforms(inp, 1)[1][1:] == [0.0, 0.25, 0.25]  # issue 18: translation kept
    level1 = zarr.open_array(str(out / "labels/segmentation/1"), mode="r")
    level0 = zarr.open_array(str(out / "labels/segmentation/0"), mode="r")
    np.testing.assert_array_equal(level1[...], level0[:, ::2, ::2])
    assert zarr.open_array(str(out / "0"), mode="r").shape == (2, 12, 20, 18)


def test_probabilities_keep_the_level_transform_and_name_channels(tmp_path):
    inp = class_input(tmp_path)
    out = tmp_path / "prob.ome.zarr"
    run(inp, out, kind="probabilities", level=1)
    meta, source = ome(out), ome(inp)["multiscales"][0]
    v05.Image.from_zarr(zarr.open_group(str(out), mode="r"))
    ms = meta["multiscales"][0]
    for k in range(2):  # output level k on input level 1 + k: same scale and translation
        assert transforms(ms, k) == transforms(source, k + 1)
    channels = meta["omero"]["channels"]
    assert [c["label"] for c in channels] == ["class 0", "class 1"]
    assert all(c["window"]["start"] == 0 and c["window"]["end"] == 1 for c in channels) and channels[0]["color"] != channels[1]["color"]
    node = next(iter(ome_reader.Reader(ome_io.parse_url(str(out)))()))
    assert node.metadata["channel_names"] == ["class 0", "class 1"]
    with pytest.raises(InputFormatError, match=r"3 resolution levels; pass --level 0..2, not 5"):
        formats.open_input(inp, level=5)


def test_class_names_colors_and_windows():
    assert omeroot.class_labels(3, ("background", "cell")) == ["background", "cell", "class 2"]
    meta = omeroot.omero_classes(2, ("bg", "fg"), dtype="uint8")
    assert [c["window"]["end"] for c in meta["channels"]] == [255.0, 255.0]
    label = omeroot.image_label("labels", classes=3, class_names=(), with_image=True)
    assert [c["label-value"] for c in label["colors"]] == [p["label-value"] for p in label["properties"]] == [0, 1, 2]
    assert label["source"] == {"image": "../../"}


def test_link_mode_links_levels_and_overwrite_keeps_the_input(tmp_path):
    inp = class_input(tmp_path)
    out = tmp_path / "linked.ome.zarr"
    run(inp, out, kind="labels", image="link")
    assert os.path.islink(out / "0") and os.path.realpath(out / "0") == os.path.realpath(os.path.join(inp, "s0"))
    v05.Image.from_zarr(zarr.open_group(str(out), mode="r"))
    before = zarr.open_array(os.path.join(inp, "s0"), mode="r")[...]
    run(inp, out, kind="labels", image="link")  # --overwrite removes the links, not what they point to
    np.testing.assert_array_equal(zarr.open_array(os.path.join(inp, "s0"), mode="r")[...], before)


def test_link_of_a_plain_array_is_refused_before_anything_is_written(tmp_path, image3d):
    inp, _ = image3d
    out = tmp_path / "seg.ome.zarr"
    with pytest.raises(ConfigError, match="not an OME-Zarr image; pass --image copy"):
        run(inp, out, kind="labels", image="link", channels=1)
    assert not out.exists()


def test_plain_input_is_copied_with_matching_levels(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, (2, 9, 140, 130)).astype("uint8")
    inp = tmp_path / "raw.zarr"
    zarr.create_array(store=str(inp), data=data, chunks=(1, 4, 32, 32), dimension_names=("c", "z", "y", "x"))
    out = tmp_path / "seg.ome.zarr"
    run(inp, out, kind="labels")
    root = zarr.open_group(str(out), mode="r")
    v05.Image.from_zarr(root)  # the same number of image and label levels
    np.testing.assert_array_equal(root["0"][...], data)
    assert len(ome(out)["multiscales"][0]["datasets"]) == len(ome(out / "labels/segmentation")["multiscales"][0]["datasets"]) == 3  # 140 -> 70 -> 35


def test_resume_and_overwrite_with_the_run_folder_beside_the_store(tmp_path):
    inp = class_input(tmp_path)
    out = tmp_path / "seg.ome.zarr"
    run(inp, out, kind="labels")
    report = run(inp, out, kind="labels", overwrite=False, resume_=True)
    assert report.blocks_done == 0 and report.blocks_skipped > 0
    run_dir = resume.RunDir(str(out))
    assert run_dir.path == tmp_path / "seg.ome.zarr.unetflow"
    report = run(inp, out, kind="labels")  # --overwrite: the old markers go with the old store
    assert report.blocks_skipped == 0 and report.blocks_done > 0


def test_cli_image_choices_and_path_to_open(tmp_path):
    from unetflow.formats.omezarr import viewer_path

    result = CliRunner().invoke(main, ["segment", "in.zarr", str(tmp_path / "x.ome.zarr"), "--model", "m.pt", "--image", "bogus"])
    assert result.exit_code == 2 and "bogus" in result.output
    assert viewer_path("p.ome.zarr", kind="labels", image="copy") == "p.ome.zarr"
    assert viewer_path("p.ome.zarr", kind="instances", image="none") == os.path.join("p.ome.zarr", "labels", "segmentation")


@pytest.mark.viewer
@pytest.mark.parametrize("kind", ["labels", "instances"])
def test_napari_opens_the_root_headless(outputs, kind):
    try:
        from napari.components import ViewerModel
    except ImportError as err:
        pytest.skip(f"napari is not installed ({err}); pip install napari napari-ome-zarr to run this check")
    pytest.importorskip("napari_ome_zarr", reason="napari-ome-zarr is not installed")
    import npe2

    npe2.PluginManager.instance().discover()  # as napari's app does at start
    out = outputs[kind]
    viewer = ViewerModel()
    layers = viewer.open(str(out), plugin="napari-ome-zarr")
    types = [type(layer).__name__ for layer in layers]
    image_layers = [layer for layer in layers if type(layer).__name__ == "Image"]
    labels = [layer for layer in layers if type(layer).__name__ == "Labels"]
    assert types.count("Labels") == 1 and len(image_layers) == (2 if kind == "labels" else 3), types
    assert image_layers[0].name.endswith("channel 0")
    (label,) = labels
    meta = ome(out / "labels/segmentation")["multiscales"][0]
    np.testing.assert_allclose(label.scale, transforms(meta, 0)[0])
    np.testing.assert_allclose(image_layers[0].scale[-3:], label.scale)
    ids = np.unique(np.asarray(label.data[-1]))
    ids = ids[ids > 0][:5]
    assert len(ids) and all(label.colormap.map(int(i))[3] > 0 for i in ids)  # objects are drawn, not transparent


def test_bioio_opens_root_image_and_label_image(outputs):
    bioio = pytest.importorskip("bioio", reason="bioio is not installed (pip install bioio bioio-ome-zarr)")
    reader = pytest.importorskip("bioio_ome_zarr", reason="bioio-ome-zarr is not installed").Reader
    out = outputs["labels"]
    image = bioio.BioImage(str(out), reader=reader)
    assert image.channel_names == ["channel 0", "channel 1"] and image.physical_pixel_sizes.Y == 1.0  # input level 1
    label = bioio.BioImage(str(out / "labels/segmentation"), reader=reader)
    assert label.physical_pixel_sizes == image.physical_pixel_sizes and int(label.data.max()) == 1


def test_preview_of_a_labels_root_shows_the_labels(outputs, tmp_path):
    png = tmp_path / "p.png"
    result = CliRunner().invoke(main, ["preview", str(outputs["instances"]), "--z", "4", "-o", str(png)])
    assert result.exit_code == 0, result.output
    assert png.exists() and "over" in result.output


# ---- neuroglancer: its own client in headless Chromium, the outputs served over HTTP


def _neuroglancer_tools():
    """neuroglancer, selenium and a Chromium with its driver, or the reason to skip."""
    import shutil

    ng = pytest.importorskip("neuroglancer", reason="neuroglancer is not installed (pip install neuroglancer selenium)")
    pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not browser or not shutil.which("chromedriver"):
        pytest.skip("no Chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver)")
    return ng, browser


@pytest.fixture(scope="module")
def neuroglancer_page(outputs):
    """A neuroglancer viewer (the client of the pip package) in headless Chromium, WebGL by
    SwiftShader, with the outputs' folder served over HTTP with CORS, as a web server would."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    ng, browser = _neuroglancer_tools()
    import neuroglancer.webdriver

    class Handler(SimpleHTTPRequestHandler):
        def end_headers(self):
            self.send_header("Access-Control-Allow-Origin", "*")
            super().end_headers()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(outputs["tmp"])))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    ng.set_server_bind_address("127.0.0.1")
    viewer = ng.Viewer()
    args = ["--use-gl=angle", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]
    driver = neuroglancer.webdriver.Webdriver(viewer, headless=True, docker=True, browser_binary_path=browser,
                                              extra_command_line_args=args, print_logs=False)
    yield viewer, driver, f"http://127.0.0.1:{httpd.server_address[1]}"
    driver.driver.quit()
    httpd.shutdown()


LAYERS_JS = """
return window.viewer.layerManager.managedLayers.map(m => {
  const l = m.layer;
  const states = l ? l.dataSources.map(d => d.loadState === undefined ? 'loading' : (d.loadState.error ? 'error: ' + d.loadState.error.message : 'ok')) : [];
  return {name: m.name, type: l ? l.type : null, sources: states};
});
"""


def _ng_layers(driver, *, count, seconds=60.0):
    """The layers of the page once *count* of them have loaded (or failed), by name."""
    import time

    t_end = time.monotonic() + seconds
    while True:
        layers = driver.driver.execute_script(LAYERS_JS)
        done = [x for x in layers if x["sources"] and "loading" not in x["sources"]]
        if len(done) >= count or time.monotonic() > t_end:
            return {x["name"]: x for x in layers}
        time.sleep(0.25)


def _settled_page(driver, *, seconds=30.0):
    """The page's pixels once two screenshots half a second apart agree (every chunk drawn)."""
    import io
    import time

    from PIL import Image

    shot, t_end = None, time.monotonic() + seconds
    while True:
        time.sleep(0.5)
        new = np.asarray(Image.open(io.BytesIO(driver.driver.get_screenshot_as_png())).convert("RGB"))
        if (shot is not None and np.array_equal(new, shot)) or time.monotonic() > t_end:
            return new
        shot = new


def _no_nulls(value):
    """A state from ``toJSON()`` that ``restoreState`` takes back: its null (default) entries left out."""
    if isinstance(value, dict):
        return {k: _no_nulls(v) for k, v in value.items() if v is not None}
    return [_no_nulls(v) for v in value] if isinstance(value, list) else value


def _drawn_colours(viewer, driver, level0, middle):
    """The colours neuroglancer draws for the layer "seg" alone at plane *middle* of *level0* (black left out)."""
    view = driver.driver.execute_script("return window.viewer.state.toJSON();")
    for layer in view["layers"]:  # the segmentation alone, the middle plane, flat on black, no UI
        layer["visible"] = layer["name"] == "seg"
    with viewer.config_state.txn() as config:
        config.show_ui_controls = False
        config.show_panel_borders = False
    panel = "const r = document.querySelector('.neuroglancer-rendered-data-panel').getBoundingClientRect(); return [r.left, r.top, r.width, r.height];"
    left, top, width, height = driver.driver.execute_script(panel)
    # the whole plane within the panel's middle half (whether the scale counts voxels or units), the
    # corner overlays (axis names, buttons) outside the middle 70% that is looked at
    scale = 2.0 * max(level0.shape[1] / height, level0.shape[2] / width)
    # voxel `middle` whether neuroglancer puts voxel i on [i, i + 1) or, with NGFF's centres, on [i - 0.5, i + 0.5)
    centre = {"z": middle + 0.25, "y": level0.shape[1] / 2, "x": level0.shape[2] / 2}
    view.update(position=[centre[a] for a in view["dimensions"]], crossSectionScale=scale,
                showAxisLines=False, showScaleBar=False, showDefaultAnnotations=False, crossSectionBackgroundColor="#000000")
    driver.driver.execute_script("window.viewer.state.restoreState(arguments[0]);", _no_nulls(view))
    page = _settled_page(driver)
    left, top, width, height = driver.driver.execute_script(panel)  # the panel without the UI controls
    ratio = page.shape[1] / driver.driver.execute_script("return window.innerWidth;")  # device pixels per CSS pixel
    y0, y1 = int((top + 0.15 * height) * ratio), int((top + 0.85 * height) * ratio)
    x0, x1 = int((left + 0.15 * width) * ratio), int((left + 0.85 * width) * ratio)
    plane = page[y0:y1, x0:x1].reshape(-1, 3)
    return {tuple(p) for p in plane if p.any()}


@pytest.mark.viewer
@pytest.mark.parametrize("kind", ["labels", "instances"])
def test_neuroglancer_opens_the_root_and_the_label_image(outputs, neuroglancer_page, kind):
    """The root as image layers (neuroglancer has no NGFF labels: it does not list labels/),
    the label image as a segmentation layer with its objects drawn, in the image's space."""
    viewer, driver, url = neuroglancer_page
    name = outputs[kind].name
    state = {"layout": "xy", "layers": [
        {"name": "root", "source": f"zarr://{url}/{name}"},  # no type: what neuroglancer makes of the root
        {"name": "auto", "source": f"zarr://{url}/{name}/labels/segmentation"},
        {"name": "seg", "type": "segmentation", "source": f"zarr://{url}/{name}/labels/segmentation"},
    ]}
    driver.reload_browser()  # a new page: the global dimensions are set by the first layers only
    driver.driver.execute_script("window.viewer.state.restoreState(arguments[0]);", state)
    channels = 2 if kind == "labels" else 3
    layers = _ng_layers(driver, count=channels + 2)
    roots = [x for n, x in layers.items() if n.startswith("root")]
    assert len(roots) == channels and all(x["type"] == "image" and x["sources"] == ["ok"] for x in roots), layers
    assert layers["seg"]["type"] == "segmentation" and layers["seg"]["sources"] == ["ok"], layers
    assert layers["auto"]["sources"] == ["ok"]  # opens; typed "image" by neuroglancer 2.41 (its zarr source says IMAGE)
    dims = driver.driver.execute_script("return window.viewer.state.toJSON().dimensions;")
    label_scale = transforms(ome(outputs[kind] / "labels/segmentation")["multiscales"][0], 0)[0]
    assert [dims[a][0] for a in "zyx"] == label_scale  # image and labels in one space, at the level's voxel size
    level0 = zarr.open_array(str(outputs[kind] / "labels/segmentation/0"), mode="r")
    middle = level0.shape[0] // 2
    colours = _drawn_colours(viewer, driver, level0, middle)
    ids = np.unique(level0[middle])
    assert len(colours) == len(ids[ids > 0]), f"{len(colours)} colours drawn for the {len(ids[ids > 0])} objects of plane {middle}"
