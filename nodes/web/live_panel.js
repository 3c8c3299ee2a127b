// The LiveTalk Live node's panel (ComfyUI front-end extension, loaded from the pack's WEB_DIRECTORY).
//
// The panel is the shared live client (livetalk_core/live/web/live_client.js, the standalone page's: the
// video canvas, 🎤 Microphone, 🎵 Audio file, ■ Stop of the session and the latency line), loaded from the
// pack's route on ComfyUI's own server, plus what only ComfyUI has:
// - when this tab queues a workflow and its LiveTalk Live node starts serving, the panel connects by itself
//   (the reference frame shows at once, then the avatar idles until someone speaks);
// - "⏏ End live node" ends the node (POST /livetalk/live/stop): the session is closed, the prompt finishes;
// - a line saying whether the node runs.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPE = "LiveTalkLive";
const ROUTE = "/livetalk/live";
const PANEL_MIN_HEIGHT = 420;
const STATUS_POLL_MS = 500;
const CONNECT_WAIT_MS = 300000; // the node loads its models before it serves
const PANELS = new Set(); // the panels of the LiveTalk Live nodes on the canvas
const STYLE = `
.livetalk-live-panel { display:flex; flex-direction:column; gap:4px; width:100%; height:100%; font:12px sans-serif;
  color:var(--input-text, #ddd); }
.livetalk-live-panel .livetalk-live { flex:1; min-height:0; display:flex; flex-direction:column; gap:4px; }
.livetalk-live-panel canvas.live-video { flex:1 1 0; min-height:0; height:0; width:100%; object-fit:contain;
  background:#111; }
.livetalk-live-panel .live-controls, .livetalk-live-panel .livetalk-live-node { display:flex; gap:6px; flex-wrap:wrap; }
.livetalk-live-panel button, .livetalk-live-panel label { cursor:pointer; }
.livetalk-live-panel .live-file-label { padding:1px 6px; border:1px solid #666; border-radius:3px; background:#444; }
`;

const routeURL = (path) => api.fileURL(`${ROUTE}${path}`);

function socketURL() {
  const url = new URL(routeURL("/ws"), window.location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

let clientModule = null;
function loadClientModule() {
  clientModule ??= import(routeURL("/live_client.js"));
  return clientModule;
}

async function liveStatus() {
  const response = await fetch(routeURL("/status"), { cache: "no-store" });
  return response.json();
}

function element(tag, props = {}, children = []) {
  const el = Object.assign(document.createElement(tag), props);
  for (const child of children) el.append(child);
  return el;
}

function addStyleOnce() {
  if (document.getElementById("livetalk-live-style")) return;
  document.head.append(element("style", { id: "livetalk-live-style", textContent: STYLE }));
}

// One panel per LiveTalk Live node on the canvas.
class LivePanel {
  constructor(node) {
    this.node = node;
    this.client = null;
    this.waitingSince = null; // while connect() waits for the node to serve
    this.view = element("div");
    this.nodeState = element("span", { textContent: "Not running: press Run to start the live node." });
    this.endButton = element("button", { type: "button", textContent: "⏏ End live node",
      title: "End the LiveTalk Live node: its session is closed and the prompt finishes (ComfyUI's Cancel does too)" });
    this.endButton.onclick = () => this.endNode();
    this.root = element("div", { className: "livetalk-live-panel" }, [
      this.view, element("div", { className: "livetalk-live-node" }, [this.endButton, this.nodeState])]);
    this.created = loadClientModule().then(({ LiveClient }) => {
      this.client = new LiveClient(socketURL(), this.view, { onStatus: () => {} });
      return this.client;
    }).catch((error) => this.say(`The live client did not load: ${error.message ?? error}`));
  }

  say(text) {
    this.nodeState.textContent = text;
  }

  // Connect to the running node's session once it serves (it loads its models first).
  async connect() {
    const client = await this.created;
    const waiting = (this.waitingSince = Date.now());
    this.say("Starting: the node loads its models…");
    while (!(await liveStatus()).running) {
      if (this.waitingSince !== waiting || Date.now() > waiting + CONNECT_WAIT_MS) return;
      await new Promise((resolve) => setTimeout(resolve, STATUS_POLL_MS));
    }
    this.waitingSince = null;
    this.say("Running: press Microphone and speak, or stream an audio file.");
    await client.connect();
  }

  // The prompt ended (End, Cancel, an error): stop waiting; the server has closed a connected session.
  promptEnded(outcome) {
    this.waitingSince = null;
    this.say(`Not running (${outcome}): press Run to start the live node again.`);
  }

  async endNode() {
    this.client?.stop();
    const response = await fetch(routeURL("/stop"), { method: "POST" });
    const body = await response.json();
    this.say(body.stopped ? "Ending the live node…" : body.message);
  }
}

app.registerExtension({
  name: "livetalk.live.panel",

  async nodeCreated(node) {
    if (node.comfyClass !== NODE_TYPE) return;
    addStyleOnce();
    const panel = new LivePanel(node);
    node.livetalkLivePanel = panel;
    PANELS.add(panel);
    const onRemoved = node.onRemoved;
    node.onRemoved = function () {
      PANELS.delete(panel);
      panel.client?.stop();
      return onRemoved?.apply(this, arguments);
    };
    node.addDOMWidget("live_panel", "livetalk_live_panel", panel.root, {
      serialize: false,
      hideOnZoom: false,
      getMinHeight: () => PANEL_MIN_HEIGHT,
    });
  },

  async setup() {
    // ComfyUI tells the tab that queued a prompt which node runs: a LiveTalk Live node starting connects its panel.
    api.addEventListener("executing", ({ detail }) => {
      const nodeId = detail?.node ?? detail;
      const panel = nodeId == null ? null : app.graph.getNodeById(Number(nodeId))?.livetalkLivePanel;
      panel?.connect().catch((error) => panel.say(String(error.message ?? error)));
    });
    for (const [event, outcome] of [["execution_success", "ended"], ["execution_error", "failed"],
      ["execution_interrupted", "cancelled"]]) {
      api.addEventListener(event, () => PANELS.forEach((panel) => panel.promptEnded(outcome)));
    }
  },
});
