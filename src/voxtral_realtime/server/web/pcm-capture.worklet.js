// AudioWorklet processor: the microphone's samples, converted to 16 kHz mono PCM16 in 80 ms frames (one model
// step each), posted to the page.  Runs on the audio rendering thread, so it only converts and posts.
import { StreamingResampler } from "./resampler.js";

const TARGET_RATE = 16000;
const FRAME_SAMPLES = 1280; // 80 ms at 16 kHz

function toPcm16(samples) {
  const pcm = new Int16Array(samples.length);
  for (let i = 0; i < samples.length; i++) {
    const value = Math.round(samples[i] * 32768);
    pcm[i] = value > 32767 ? 32767 : value < -32768 ? -32768 : value;
  }
  return pcm;
}

class Pcm16Capture extends AudioWorkletProcessor {
  constructor() {
    super();
    // `sampleRate` is the AudioContext's rate, a global of the worklet scope
    this.resampler = new StreamingResampler(sampleRate, TARGET_RATE);
    this.pending = new Float32Array(FRAME_SAMPLES);
    this.filled = 0;
    this.stopped = false;
    this.port.onmessage = (event) => {
      if (event.data?.type === "flush") this.#flush();
    };
  }

  process(inputs) {
    if (this.stopped) return false;
    const channel = inputs[0]?.[0]; // the node mixes its input down to one channel
    if (channel) this.#add(this.resampler.push(channel));
    return true;
  }

  #add(samples) {
    let offset = 0;
    while (offset < samples.length) {
      const count = Math.min(FRAME_SAMPLES - this.filled, samples.length - offset);
      this.pending.set(samples.subarray(offset, offset + count), this.filled);
      this.filled += count;
      offset += count;
      if (this.filled === FRAME_SAMPLES) this.#post(this.pending);
    }
  }

  #post(samples) {
    const pcm = toPcm16(samples);
    this.port.postMessage({ type: "audio", pcm }, [pcm.buffer]);
    this.filled = 0;
  }

  #flush() {
    this.#add(this.resampler.flush());
    if (this.filled) this.#post(this.pending.subarray(0, this.filled));
    this.stopped = true;
    this.port.postMessage({ type: "flushed" });
  }
}

registerProcessor("pcm16-capture", Pcm16Capture);
