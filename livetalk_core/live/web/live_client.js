// The live client (docs/live.md), shared by the standalone page (index.html) and the ComfyUI panel:
//   const client = new LiveClient("ws://host/live/ws", container, {startMessage: () => ({prompt, image})});
// It draws a video canvas, the measured latency and the Microphone / Audio file / Stop controls into
// `container`; sends 16 kHz mono int16 audio (the browser resamples the microphone or the file); decodes the
// H.264 blocks with WebCodecs and plays each block's audio with WebAudio, both scheduled by the time stamps of
// the session's timeline, so lips and sound stay in sync. No external resources (works offline).

const SAMPLE_RATE = 16000;
const CHUNK_SAMPLES = 1600; // 100 ms per audio message
const KIND = { AUDIO: 1, BLOCK: 2, REFERENCE: 3 };
const PREFIX_BYTES = 5; // kind (1 byte) + header length (uint32 LE)
const PLAYOUT_MARGIN_S = 0.05; // a block's audio is scheduled at least this far ahead of "now"
const LATENCY_WINDOW = 20; // the latency shown is the median of this many recent blocks with speech

/** A binary message: [kind][header length][JSON header][payload]. */
export function packBinary(kind, header, payload) {
  const head = header ? new TextEncoder().encode(JSON.stringify(header)) : new Uint8Array(0);
  const body = payload ? new Uint8Array(payload.buffer, payload.byteOffset, payload.byteLength) : new Uint8Array(0);
  const out = new Uint8Array(PREFIX_BYTES + head.length + body.length);
  const view = new DataView(out.buffer);
  view.setUint8(0, kind);
  view.setUint32(1, head.length, true);
  out.set(head, PREFIX_BYTES);
  out.set(body, PREFIX_BYTES + head.length);
  return out.buffer;
}

export function unpackBinary(buffer) {
  const view = new DataView(buffer);
  const kind = view.getUint8(0);
  const headerLength = view.getUint32(1, true);
  const header = headerLength
    ? JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, PREFIX_BYTES, headerLength))) : {};
  return { kind, header, payload: new Uint8Array(buffer, PREFIX_BYTES + headerLength) };
}

/** float samples in [-1, 1] -> int16 (the rounding the server uses). */
export function toInt16(floats) {
  const out = new Int16Array(floats.length);
  for (let i = 0; i < floats.length; i++) out[i] = Math.max(-32768, Math.min(32767, Math.round(floats[i] * 32768)));
  return out;
}

/** Linear resampler to 16 kHz for browsers whose AudioContext cannot run at 16 kHz with a microphone. */
class Resampler {
  constructor(inputRate) { this.step = inputRate / SAMPLE_RATE; this.position = 0; this.previous = 0; }
  push(input) {
    const out = [];
    let p = this.position;
    for (; p <= input.length - 1; p += this.step) {
      const i = Math.floor(p), frac = p - i;
      const a = i < 0 ? this.previous : input[i];
      const b = i + 1 < input.length ? input[i + 1] : a;
      out.push(a + (b - a) * frac);
    }
    this.position = p - input.length;
    this.previous = input[input.length - 1];
    return Float32Array.from(out);
  }
}

function median(values) {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted.length ? sorted[Math.floor(sorted.length / 2)] : null;
}

function socketUrl(url) {
  const resolved = new URL(url, window.location.href);
  if (resolved.protocol === "http:") resolved.protocol = "ws:";
  if (resolved.protocol === "https:") resolved.protocol = "wss:";
  return resolved.href;
}

export class LiveClient {
  constructor(url, container, { startMessage = () => ({}), onStatus = () => {} } = {}) {
    this.url = socketUrl(url);
    this.startMessage = startMessage;
    this.onStatus = onStatus;
    this.frames = []; // decoded VideoFrames waiting for their time
    this.resetSession();
    this.buildUi(container);
  }

  /** A new session starts a new timeline: its own sample count, clock origin, decoder and statistics. */
  resetSession() {
    this.stats = { blocks: 0, framesDecoded: 0, framesDrawn: 0, audioBuffersScheduled: 0, dropped: 0, stalls: 0,
                   latencyMs: null, speechSamplesSent: 0, referenceShown: false };
    this.latencies = [];
    this.sendLog = []; // [samples sent so far, performance.now()]
    this.frames.forEach((frame) => frame.close());
    this.frames = [];
    this.origin = undefined;
    if (this.decoder && this.decoder.state !== "closed") this.decoder.close();
    this.decoder = null;
  }

  buildUi(container) {
    container.classList.add("livetalk-live");
    container.innerHTML = `
      <canvas class="live-video" width="512" height="512"></canvas>
      <div class="live-controls">
        <button class="live-mic" type="button">Microphone</button>
        <label class="live-file-label">Audio file<input class="live-file" type="file" accept="audio/*" hidden></label>
        <button class="live-stop" type="button" disabled>Stop</button>
      </div>
      <div class="live-status">not connected</div>
      <div class="live-stats"></div>`;
    this.canvas = container.querySelector(".live-video");
    this.context2d = this.canvas.getContext("2d");
    this.statusLine = container.querySelector(".live-status");
    this.statsLine = container.querySelector(".live-stats");
    this.micButton = container.querySelector(".live-mic");
    this.stopButton = container.querySelector(".live-stop");
    this.micButton.addEventListener("click", () => this.run(() => this.startMicrophone()));
    container.querySelector(".live-file").addEventListener("change", (event) => {
      const file = event.target.files[0];
      event.target.value = "";
      if (file) this.run(() => this.streamFile(file));
    });
    this.stopButton.addEventListener("click", () => this.stop());
  }

  async run(action) {
    try {
      await action();
    } catch (error) {
      this.status(`error: ${error.message || error}`);
    }
  }

  status(text) {
    this.statusText = text;
    this.statusLine.textContent = text;
    this.onStatus(text);
  }

  // --- the session -------------------------------------------------------------------------------------
  /** Open the socket and the session (start message); resolves when the server says "ready". */
  connect() {
    if (this.ready) return this.ready;
    this.resetSession();
    this.audio = this.audio || this.newAudioContext();
    this.ready = new Promise((resolve, reject) => {
      this.socket = new WebSocket(this.url);
      this.socket.binaryType = "arraybuffer";
      this.socket.onmessage = (event) => this.receive(event.data, resolve, reject);
      this.socket.onclose = (event) => this.closed(event, reject);
      this.socket.onopen = () => this.status("connected, opening the session…");
    });
    this.stopButton.disabled = false;
    return this.ready;
  }

  newAudioContext() {
    try {
      return new AudioContext({ sampleRate: SAMPLE_RATE, latencyHint: "interactive" });
    } catch {
      return new AudioContext({ latencyHint: "interactive" });
    }
  }

  receive(data, resolve, reject) {
    if (typeof data !== "string") return this.receiveBinary(unpackBinary(data));
    const message = JSON.parse(data);
    if (message.type === "hello") this.socket.send(JSON.stringify({ type: "start", ...this.startMessage() }));
    else if (message.type === "loading") this.status("loading the session… (a server's first session also warms the model up: on a GPU, up to a minute)");
    else if (message.type === "ready") { this.info = message; this.startVideo(message); resolve(message); }
    else if (message.type === "error") { this.status(`${message.code}: ${message.message}`); reject(new Error(message.message)); }
    else if (message.type === "stopped") this.status(`stopped: ${message.frames} frames, ${message.dropped_blocks} dropped`);
  }

  closed(event, reject) {
    if (event.code !== 1000 && !String(this.statusText || "").includes(":")) {
      this.status(`connection closed (${event.code}) ${event.reason || ""}`);
    }
    reject(new Error(event.reason || `connection closed (${event.code})`));
    this.finish();
  }

  finish() {
    this.stopMicrophone();
    this.streaming = false;
    this.ready = null;
    this.stopButton.disabled = true;
  }

  stop() {
    this.streaming = false;
    if (this.socket && this.socket.readyState === WebSocket.OPEN) this.socket.send(JSON.stringify({ type: "stop" }));
    this.stopMicrophone();
  }

  /** Release the microphone and take its capture nodes out of the graph (a later session makes new ones). */
  stopMicrophone() {
    if (this.microphone) this.microphone.getTracks().forEach((track) => track.stop());
    this.microphone = null;
    (this.captureNodes || []).forEach((node) => node.disconnect());
    if (this.captureNodes) this.captureNodes[1].port.onmessage = null;
    this.captureNodes = null;
  }

  // --- sending audio -----------------------------------------------------------------------------------
  sendAudio(floats) {
    if (!this.socket || this.socket.readyState !== WebSocket.OPEN || !floats.length) return;
    this.socket.send(packBinary(KIND.AUDIO, null, toInt16(floats)));
    this.stats.speechSamplesSent += floats.length;
    this.sendLog.push([this.stats.speechSamplesSent, performance.now()]);
  }

  async startMicrophone() {
    this.audio = this.audio || this.newAudioContext();
    await this.audio.resume(); // inside the click: browsers let audio start on a user's gesture
    await this.connect();
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true } });
    this.microphone = stream;
    await this.audio.audioWorklet.addModule(new URL("./audio_capture.js", import.meta.url));
    const source = this.audio.createMediaStreamSource(stream);
    const capture = new AudioWorkletNode(this.audio, "livetalk-live-capture");
    const resampler = this.audio.sampleRate === SAMPLE_RATE ? null : new Resampler(this.audio.sampleRate);
    let pending = [];
    capture.port.onmessage = (event) => {
      const samples = resampler ? resampler.push(event.data) : event.data;
      pending.push(...samples);
      if (pending.length >= CHUNK_SAMPLES) { this.sendAudio(Float32Array.from(pending)); pending = []; }
    };
    const mute = this.audio.createGain();
    mute.gain.value = 0; // the worklet must be pulled by the graph, but the microphone is not played back
    source.connect(capture).connect(mute).connect(this.audio.destination);
    this.captureNodes = [source, capture, mute];
    this.status("listening…");
  }

  /** Decode `file`, turn it into 16 kHz mono, and send it at real-time pace (as if spoken now). */
  async streamFile(file) {
    this.audio = this.audio || this.newAudioContext();
    await this.audio.resume(); // inside the click: browsers let audio start on a user's gesture
    await this.connect();
    const decoded = await this.audio.decodeAudioData(await file.arrayBuffer());
    const mono = await this.to16kMono(decoded);
    this.streaming = true;
    this.status(`streaming ${file.name} (${(mono.length / SAMPLE_RATE).toFixed(1)} s)…`);
    const start = performance.now();
    for (let offset = 0; offset < mono.length && this.streaming; offset += CHUNK_SAMPLES) {
      const chunk = mono.subarray(offset, offset + CHUNK_SAMPLES);
      const due = start + ((offset + chunk.length) / SAMPLE_RATE) * 1000;
      await new Promise((done) => setTimeout(done, Math.max(0, due - performance.now())));
      this.sendAudio(chunk);
    }
    if (this.streaming) this.status(`${file.name} sent; the avatar listens again`);
    this.streaming = false;
  }

  async to16kMono(buffer) {
    const offline = new OfflineAudioContext(1, Math.ceil(buffer.duration * SAMPLE_RATE), SAMPLE_RATE);
    const source = offline.createBufferSource();
    source.buffer = buffer; // several channels are mixed down to the one output channel
    source.connect(offline.destination);
    source.start();
    return (await offline.startRendering()).getChannelData(0);
  }

  // --- receiving blocks --------------------------------------------------------------------------------
  startVideo(info) {
    this.canvas.width = info.width;
    this.canvas.height = info.height;
    this.needKeyframe = true;
    this.decoder = new VideoDecoder({
      output: (frame) => { this.stats.framesDecoded += 1; this.frames.push(frame); },
      error: (error) => { this.status(`video decoder: ${error.message}`); this.needKeyframe = true; },
    });
    this.decoder.configure({ codec: info.codec, codedWidth: info.width, codedHeight: info.height,
                             optimizeForLatency: true });
    this.status("live: speak, or stream an audio file");
    const loop = (this.drawLoop = (this.drawLoop || 0) + 1); // one drawing loop, the newest session's
    const draw = () => { this.drawDue(); if (this.drawLoop === loop) requestAnimationFrame(draw); };
    requestAnimationFrame(draw);
  }

  async receiveBinary({ kind, header, payload }) {
    if (kind === KIND.REFERENCE) {
      const bitmap = await createImageBitmap(new Blob([payload], { type: header.mime }));
      this.canvas.width = header.width;
      this.canvas.height = header.height;
      this.context2d.drawImage(bitmap, 0, 0);
      this.stats.referenceShown = true;
    } else if (kind === KIND.BLOCK) {
      this.receiveBlock(header, payload);
    }
  }

  receiveBlock(header, payload) {
    const arrived = performance.now();
    this.stats.blocks += 1;
    this.stats.dropped = header.dropped_blocks;
    this.measureLatency(header, arrived);
    if (this.origin === undefined) this.origin = this.audio.currentTime + PLAYOUT_MARGIN_S - header.audio_start / SAMPLE_RATE;
    let offset = 0;
    const fps = this.info.fps;
    header.frame_bytes.forEach((size, i) => {
      const key = header.keyframe && i === 0;
      if (key) this.needKeyframe = false;
      if (!this.needKeyframe && this.decoder.state === "configured") {
        this.decoder.decode(new EncodedVideoChunk({ type: key ? "key" : "delta", data: payload.subarray(offset, offset + size),
                                                    timestamp: Math.round(((header.first_frame + i) * 1e6) / fps) }));
      }
      offset += size;
    });
    const pcm = new Int16Array(payload.slice(offset, offset + 2 * header.audio_samples).buffer);
    this.scheduleAudio(pcm, header.audio_start);
  }

  scheduleAudio(pcm, audioStart) {
    const buffer = this.audio.createBuffer(1, pcm.length, SAMPLE_RATE);
    const channel = buffer.getChannelData(0);
    for (let i = 0; i < pcm.length; i++) channel[i] = pcm[i] / 32768;
    let at = this.origin + audioStart / SAMPLE_RATE;
    const earliest = this.audio.currentTime + PLAYOUT_MARGIN_S;
    if (at < earliest) { // late: the player waits for it (its clock shifts), one stall
      this.origin += earliest - at;
      at = earliest;
      this.stats.stalls += 1;
    }
    const source = this.audio.createBufferSource();
    source.buffer = buffer;
    source.connect(this.audio.destination);
    source.start(at);
    this.stats.audioBuffersScheduled += 1;
  }

  measureLatency(header, arrived) {
    if (!header.speech_samples) return;
    const entry = this.sendLog.find(([count]) => count >= header.client_samples_end);
    if (!entry) return;
    this.latencies.push(arrived - entry[1]);
    if (this.latencies.length > LATENCY_WINDOW) this.latencies.shift();
    this.sendLog = this.sendLog.filter(([count]) => count >= header.client_samples_end);
    this.stats.latencyMs = Math.round(median(this.latencies));
  }

  /** Show the newest decoded frame whose time on the timeline has come. */
  drawDue() {
    if (this.origin === undefined || !this.frames.length) return;
    const now = (this.audio.currentTime - this.origin) * 1e6;
    let due = null;
    while (this.frames.length && this.frames[0].timestamp <= now) {
      if (due) due.close();
      due = this.frames.shift();
    }
    if (!due) return;
    this.context2d.drawImage(due, 0, 0, this.canvas.width, this.canvas.height);
    due.close();
    this.stats.framesDrawn += 1;
    const s = this.stats;
    this.statsLine.textContent = `latency ${s.latencyMs ?? "–"} ms · ${s.framesDrawn} frames shown · `
      + `dropped ${s.dropped} · stalls ${s.stalls}`;
  }
}
