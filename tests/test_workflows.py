"""The shipped workflows: each UI graph (workflows/, with its .jpg thumbnail) and its API twin
(workflows/api/) describe the same graph, and both validate against the pack's real node definitions
in a running ComfyUI. ComfyUI offers every ``*.json`` directly in a pack's ``workflows/`` (or
``example_workflows/``, ``examples/``...) as a template and serves them from the first of those
folders that exists, so the API twins live one folder down, where it does not look."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from comfy_env import PACK_DIR_NAME, REPO, livetalk_server

UI_DIR = REPO / "workflows"
API_DIR = UI_DIR / "api"
# Folder names ComfyUI (0.3.75 to 0.28, app/custom_node_manager.py) scans for a pack's templates.
TEMPLATE_FOLDERS = ("example_workflows", "example", "examples", "workflow", "workflows")
UI_FILES = sorted(UI_DIR.glob("*.json"))
PACK_ID = "livetalk"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Node types whose file widgets are not the pack's: their files are not in the test server.
MODEL_LOADERS = {"LoadLiveTalkModel", "CLIPLoader"}


def api_twin(ui_path: Path) -> Path:
    return API_DIR / f"{ui_path.stem}_api.json"


@pytest.fixture(scope="module")
def comfy(request):
    return livetalk_server(request)


@pytest.fixture(scope="module")
def object_info(comfy):
    return comfy.get("/object_info")


def _spec(info: dict, name: str) -> tuple[list, str]:
    for section in ("required", "optional"):
        if name in info["input"].get(section, {}):
            return info["input"][section][name], section
    raise KeyError(name)


def _is_widget(spec: list) -> bool:
    return isinstance(spec[0], list) or (spec[0] in WIDGET_TYPES and not (len(spec) > 1 and spec[1].get("forceInput")))


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """Convert a UI (0.4) graph to the API format the way the front end does, from /object_info:
    widget values in input order (skipping the extra values of seed-control and upload widgets),
    links from the link table; a linked widget takes the link."""
    links = {link[0]: link for link in ui["links"]}
    prompt = {}
    for node in ui["nodes"]:
        if node.get("mode", 0) != 0:
            continue
        info = object_info[node["type"]]
        order = info["input_order"].get("required", []) + info["input_order"].get("optional", [])
        linked = {i["name"]: links[i["link"]] for i in node["inputs"] if i.get("link") is not None}
        values = list(node.get("widgets_values", []))
        inputs = {}
        for name in order:
            spec, section = _spec(info, name)
            options = spec[1] if len(spec) > 1 else {}
            if _is_widget(spec):
                if not values and section == "optional":
                    continue  # added after the graph was saved: the front end shows its default
                value = values.pop(0)
                if options.get("control_after_generate"):
                    values.pop(0)
                if options.get("image_upload"):
                    values.pop(0)
                if options.get("audio_upload"):
                    del values[:2]
                if name not in linked:
                    inputs[name] = value
            if name in linked:
                inputs[name] = [str(linked[name][1]), linked[name][2]]
        assert not values, f"node {node['id']} ({node['type']}) has unused widget values {values}"
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def validate_against_definitions(prompt: dict, object_info: dict) -> list[str]:
    """Every node exists, every required input is given, links connect matching types, widget values
    are in range / in the option list (except the model file lists, which depend on the machine)."""
    problems = []
    for node_id, node in prompt.items():
        info = object_info.get(node["class_type"])
        if info is None:
            problems.append(f"{node_id}: unknown node type {node['class_type']}")
            continue
        for name in info["input"].get("required", {}):
            if name not in node["inputs"]:
                problems.append(f"{node_id}.{name}: required input missing")
        for name, value in node["inputs"].items():
            try:
                spec, _ = _spec(info, name)
            except KeyError:
                problems.append(f"{node_id}.{name}: no such input")
                continue
            options = spec[1] if len(spec) > 1 else {}
            if isinstance(value, list):
                source = prompt.get(value[0])
                if source is None:
                    problems.append(f"{node_id}.{name}: links to missing node {value[0]}")
                    continue
                produced = object_info[source["class_type"]]["output"][value[1]]
                expected = "COMBO" if isinstance(spec[0], list) else spec[0]
                if produced != expected and "*" not in (produced, expected):
                    problems.append(f"{node_id}.{name}: gets {produced}, needs {expected}")
            elif isinstance(spec[0], list) or spec[0] == "COMBO":
                choices = spec[0] if isinstance(spec[0], list) else options.get("options", [])
                if node["class_type"] not in MODEL_LOADERS and node["class_type"] not in ("LoadImage", "LoadAudio") \
                        and value not in choices:
                    problems.append(f"{node_id}.{name}: {value!r} not in {choices}")
            elif spec[0] in ("INT", "FLOAT"):
                if not options.get("min", value) <= value <= options.get("max", value):
                    problems.append(f"{node_id}.{name}: {value} outside [{options.get('min')}, {options.get('max')}]")
    return problems


def test_every_ui_workflow_has_an_api_twin_and_a_thumbnail():
    assert UI_FILES, "no example workflows shipped"
    assert sorted(p.name for p in API_DIR.glob("*.json")) == sorted(api_twin(p).name for p in UI_FILES)
    for path in UI_FILES:
        assert path.with_suffix(".jpg").is_file(), f"{path.name} has no thumbnail"


@pytest.mark.parametrize("ui_path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_metadata(ui_path):
    ui = json.loads(ui_path.read_text())
    assert ui["version"] == 0.4
    for node in ui["nodes"]:
        properties = node["properties"]
        is_pack_node = node["type"].startswith(("LiveTalk", "LoadLiveTalk"))
        assert properties["cnr_id"] == (PACK_ID if is_pack_node else "comfy-core"), node["type"]
        if node["type"] in MODEL_LOADERS:
            hints = properties["models"]
            assert hints and all({"name", "url", "directory"} <= set(h) for h in hints)
            named = set(node["widgets_values"])
            assert all(h["name"] in named for h in hints), "a download hint names a file the node does not use"


@pytest.mark.parametrize("ui_path", UI_FILES, ids=lambda p: p.stem)
def test_ui_and_api_twins_are_the_same_graph(ui_path, object_info):
    from_ui = ui_to_api(json.loads(ui_path.read_text()), object_info)
    twin = json.loads(api_twin(ui_path).read_text())
    api = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in twin.items()}
    assert from_ui == api


@pytest.mark.parametrize("ui_path", UI_FILES, ids=lambda p: p.stem)
def test_workflows_validate_against_the_real_node_definitions(ui_path, object_info):
    api = json.loads(api_twin(ui_path).read_text())
    assert validate_against_definitions(api, object_info) == []


@pytest.mark.parametrize("ui_path", UI_FILES, ids=lambda p: p.stem)
def test_server_rejects_the_shipped_workflow_only_for_the_missing_text_encoder(ui_path, comfy):
    """ComfyUI's own validation of the untouched API workflow: the tiny test models stand under the
    shipped names, so the only error left is the full umT5 file CI cannot hold."""
    api = json.loads(api_twin(ui_path).read_text())
    status, body = comfy.post("/prompt", {"prompt": api, "client_id": comfy.client_id})
    assert status == 400
    errors = {(node_id, e["extra_info"].get("input_name"), e["type"])
              for node_id, entry in body["node_errors"].items() for e in entry["errors"]}
    clip_loader = next(k for k, v in api.items() if v["class_type"] == "CLIPLoader")
    assert errors == {(clip_loader, "clip_name", "value_not_in_list")}, body["node_errors"]


def test_only_the_ui_workflows_are_in_a_folder_comfyui_scans_for_templates():
    scanned = [path for folder in TEMPLATE_FOLDERS for path in (REPO / folder).glob("*.json")]
    assert sorted(scanned) == UI_FILES
    assert all(json.loads(path.read_text()).get("nodes") for path in scanned), "an API-format file would be a template"


def test_server_offers_each_ui_workflow_as_a_template_that_opens(comfy):
    """The template browser lists exactly the UI workflows, and each card's workflow and thumbnail
    are served (a card whose file is not served fails with a 404 when clicked)."""
    templates = comfy.get("/workflow_templates").get(PACK_DIR_NAME, [])
    assert sorted(templates) == [p.stem for p in UI_FILES]
    for name in templates:
        served = comfy.get(f"/api/workflow_templates/{PACK_DIR_NAME}/{name}.json")
        assert served == json.loads((UI_DIR / f"{name}.json").read_text())
        picture_url = f"{comfy.url}/api/workflow_templates/{PACK_DIR_NAME}/{name}.jpg"
        with urllib.request.urlopen(picture_url, timeout=30) as response:
            assert response.status == 200 and response.read() == (UI_DIR / f"{name}.jpg").read_bytes()
