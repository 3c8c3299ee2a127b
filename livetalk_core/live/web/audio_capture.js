// AudioWorklet processor for the live page (docs/live.md): hands the microphone's first channel to the page
// in blocks of 128 samples at the AudioContext's rate; live_client.js resamples them to 16 kHz and sends them.
class LiveCapture extends AudioWorkletProcessor {
  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel && channel.length) this.port.postMessage(channel.slice(0));
    return true;
  }
}

registerProcessor("livetalk-live-capture", LiveCapture);
