// The LiveTalk Live node's panel (ComfyUI front-end extension, loaded from the pack's WEB_DIRECTORY).
//
// A panel on the node: the live video, a microphone button, an audio file to stream, Stop, and a status
// line. The video, the audio playback and the microphone capture are the shared live client
// (livetalk_core/live/web/live_client.js, the standalone page's), loaded from the pack's route on
// ComfyUI's own server; this file only adds the buttons and follows the node's run:
// - when this tab queues a workflow and its LiveTalk Live node starts, the panel connects (the reference
//   frame shows at once, then the avatar idles until someone speaks);
// - the microphone button (or "Stream a file") sends speech; pressing it again stops the microphone;
// - Stop ends the node (POST /livetalk/live/stop): its session is closed and the prompt finishes.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPE = "LiveTalkLive";
const ROUTE = "/livetalk/live";
const PANEL_MIN_HEIGHT = 420;
const STATUS_POLL_MS = 500;
const CONNECT_WAIT_MS = 120000; // the node loads its models before it serves

const PANELS = new Set(); // the panels of the LiveTalk Live nodes on the canvas

const routeURL = (path) => `${api.api_base}${ROUTE}${path}`;

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

// One panel per LiveTalk Live node on the canvas.
class LivePanel {
  constructor(node) {
    this.node = node;
    this.client = null;
    this.microphoneOn = false;
    this.waitingSince = null; // while connect() waits for the node to serve
    this.status = element("div", { className: "livetalk-live-status", textContent: "Not running: press Run (Queue)." });
    this.view = element("div", { className: "livetalk-live-view" });
    this.micButton = element("button", { className: "livetalk-live-mic", textContent: "🎤 Talk",
      title: "Stream your microphone to the avatar (press again to stop the microphone)" });
    this.fileInput = element("input", { type: "file", accept: "audio/*", hidden: true });
    this.fileButton = element("button", { textContent: "Stream a file", title: "Stream an audio file at real-time pace" });
    this.stopButton = element("button", { textContent: "■ Stop", title: "End the live session: the node returns" });
    this.root = element("div", { className: "livetalk-live-panel" }, [
      this.view,
      element("div", { className: "livetalk-live-buttons" }, [this.micButton, this.fileButton, this.stopButton, this.fileInput]),
      this.status,
    ]);
    this.root.style.cssText = "display:flex;flex-direction:column;gap:6px;width:100%;height:100%;font:12px sans-serif;";
    this.view.style.cssText = "flex:1;min-height:256px;background:#111;display:flex;align-items:center;justify-content:center;";
    this.micButton.onclick = () => this.toggleMicrophone();
    this.fileButton.onclick = () => this.fileInput.click();
    this.fileInput.onchange = () => this.fileInput.files[0] && this.streamFile(this.fileInput.files[0]);
    this.stopButton.onclick = () => this.stopNode();
  }

  say(text) {
    this.status.textContent = text;
  }

  // Connect to the running node's session (waiting for the node to serve); a no-op when connected.
  async connect() {
    if (this.client) return this.client;
    const waiting = (this.waitingSince = Date.now());
    this.say("Waiting for the LiveTalk Live node to serve…");
    while (!(await liveStatus()).running) {
      if (this.waitingSince !== waiting || Date.now() > waiting + CONNECT_WAIT_MS) {
        throw new Error("the LiveTalk Live node is not running: press Run (Queue) first");
      }
      await new Promise((resolve) => setTimeout(resolve, STATUS_POLL_MS));
    }
    this.waitingSince = null;
    const { LiveClient } = await loadClientModule();
    const client = new LiveClient(socketURL(), this.view, {
      onStatus: (text) => this.say(text),
      onClose: ({ code, reason }) => this.disconnected(client, code, reason),
    });
    this.client = client;
    this.say("Opening the session…");
    await client.connect();
    this.say("Live: press 🎤 Talk and speak.");
    return client;
  }

  disconnected(client, code, reason) {
    if (this.client !== client) return;
    this.client = null;
    this.setMicrophone(false);
    this.say(code === 1000 ? "Session ended." : `Session closed (${code}${reason ? `: ${reason}` : ""}).`);
  }

  // The prompt ended (Stop, Cancel, an error): stop waiting for the node; the server closes a connected client.
  promptEnded(outcome) {
    this.waitingSince = null;
    if (!this.client) this.say(`Not running (${outcome}): press Run (Queue) to start again.`);
  }

  setMicrophone(on) {
    this.microphoneOn = on;
    this.micButton.textContent = on ? "🎤 Listening… (press to mute)" : "🎤 Talk";
  }

  async toggleMicrophone() {
    try {
      if (this.microphoneOn) {
        this.client?.stopMicrophone();
        this.setMicrophone(false);
        return;
      }
      const client = await this.connect();
      await client.startMicrophone();
      this.setMicrophone(true);
    } catch (error) {
      this.say(`Microphone: ${error.message ?? error}`);
    }
  }

  async streamFile(file) {
    try {
      const client = await this.connect();
      this.say(`Streaming ${file.name}…`);
      await client.streamFile(file);
    } catch (error) {
      this.say(`Stream: ${error.message ?? error}`);
    }
  }

  async stopNode() {
    this.client?.stopMicrophone();
    const response = await fetch(routeURL("/stop"), { method: "POST" });
    const body = await response.json();
    this.say(body.stopped ? "Stopping…" : body.message);
  }
}

app.registerExtension({
  name: "livetalk.live.panel",

  async nodeCreated(node) {
    if (node.comfyClass !== NODE_TYPE) return;
    const panel = new LivePanel(node);
    node.livetalkLivePanel = panel;
    PANELS.add(panel);
    const onRemoved = node.onRemoved;
    node.onRemoved = function () {
      PANELS.delete(panel);
      panel.client?.close();
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
      const node = nodeId == null ? null : app.graph.getNodeById(Number(nodeId));
      const panel = node?.livetalkLivePanel;
      panel?.connect().catch((error) => panel.say(String(error.message ?? error)));
    });
    for (const [event, outcome] of [["execution_success", "finished"], ["execution_error", "failed"],
      ["execution_interrupted", "cancelled"]]) {
      api.addEventListener(event, () => PANELS.forEach((panel) => panel.promptEnded(outcome)));
    }
  },
});
